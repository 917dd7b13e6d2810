"""What chat costs: rendering a 20-message conversation with 10 tools, and the streaming parse
per token at 100, 1,000 and 4,000 output tokens (it must stay flat as the output grows: text that
extends the open content or reasoning is appended without a re-parse).

Run: ``python benchmarks/bench_chat.py`` after installing llamabind (from the repo root, with
the pinned tree's templates in vendor/llama.cpp/models/templates).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import llamabind as lb  # noqa: E402
from llamabind.chat import ChatParser, ChatTemplates  # noqa: E402
from tinymodels import write_tiny_llama  # noqa: E402

TEMPLATES = ROOT / "vendor" / "llama.cpp" / "models" / "templates"


def conversation(n: int = 20) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": "You are a helpful assistant with tools."}]
    for i in range(n - 1):
        role = "user" if i % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": f"Message {i}: " + "some words here " * 8})
    return msgs


def tools(n: int = 10) -> list[dict]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool number {i}",
        "parameters": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                       "required": ["a"]}}} for i in range(n)]


def best_of(fn, repeat: int = 20) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        model = lb.Model(write_tiny_llama(Path(d) / "tiny.gguf", template=None), vocab_only=True)
        # Each format's output opens as a model would open it, then streams content.
        opening = {"Qwen-Qwen3-0.6B.jinja": "<think>\nok\n</think>\n\n", "meta-llama-Llama-3.1-8B-Instruct.jinja": "",
                   "openai-gpt-oss-120b.jinja": "<|channel|>analysis<|message|>ok<|end|><|start|>assistant"
                                                "<|channel|>final<|message|>"}
        for name, first in opening.items():
            t = ChatTemplates(model, (TEMPLATES / name).read_text())
            msgs, tl = conversation(), tools()
            render = best_of(lambda: t.apply(msgs, tools=tl))
            plain = best_of(lambda: t.apply(msgs))
            print(f"{name}: render 20 messages + 10 tools {render * 1e6:8.0f} us; without tools {plain * 1e6:8.0f} us")
            prompt = t.apply(msgs[:2], tools=tl)
            piece = "word "  # one token's text
            for n in (100, 1000, 4000):
                parser = ChatParser(prompt)
                parser.feed(first)
                for _ in range(n - 50):
                    parser.feed(piece)
                last = [0.0]

                def feed50() -> None:
                    t0 = time.perf_counter()
                    for _ in range(50):
                        parser.feed(piece)
                    last[0] = (time.perf_counter() - t0) / 50

                feed50()
                print(f"  streaming parse at {n:5d} tokens: {last[0] * 1e6:8.1f} us/token "
                      f"({parser.reparses} full parses in {n} feeds)")
        model.close()


if __name__ == "__main__":
    main()
