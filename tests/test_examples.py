"""The runtime examples (examples/*.py) run against real models: tiny random ones where the
behaviour is what counts, the default chat model (SmolLM2-135M-Instruct) where the answer must
make sense, and each script's own main() once, as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import llamabind as lb
from llamabind import mtmd
from llamabind.model import sha256_file
from conftest import REPO, TEMPLATES
from tinymm import make_image, make_tone, n_image_tokens, write_tiny_mmproj
from tinymodels import write_tiny_llama

EXAMPLES = REPO / "examples"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inferd():
    return load("inferd_engine")


@pytest.fixture(scope="module")
def xybrid():
    return load("xybrid_core")


@pytest.fixture(scope="module")
def car():
    return load("car_inference")


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory, llama_test_material) -> str:
    """A tiny random model with Qwen's vocabulary and Qwen3's template (thinking tags, tool calls)."""
    return write_tiny_llama(tmp_path_factory.mktemp("qwen") / "qwen3.gguf", n_embd=16, n_ff=32, f16=True,
                            template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(),
                            vocab_from=llama_test_material / "models" / "ggml-vocab-qwen2.gguf")


class Script(lb.PySampler):
    """Makes the model say ``text`` (then ``repeat`` forever) whatever it would have said."""

    def __init__(self, vocab, text: str, repeat: str = ""):
        super().__init__()
        self.toks = [int(t) for t in vocab.tokenize(text, add_special=False, parse_special=True)]
        self.toks += [int(t) for t in vocab.tokenize(repeat, add_special=False, parse_special=True)] * 100
        self.i = 0

    def apply(self, cur):
        cur.data["logit"][cur.data["id"] != self.toks[min(self.i, len(self.toks) - 1)]] = -np.inf

    def accept(self, token):
        self.i += 1


def scripted(vocab, text: str, repeat: str = "", eog: bool = True) -> lb.Sampler:
    s = Script(vocab, text, repeat)
    if eog and not repeat:
        s.toks.append(vocab.eos)
    return lb.Sampler.chain(s.as_sampler(), lb.Sampler.greedy())


def run_main(name: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


# -- 1. inferd-engine ---------------------------------------------------------------------------

def test_inferd_loads_by_hash_and_refuses_a_wrong_one(inferd, tiny_model_path, tmp_path):
    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf", audio=True)
    good = dict(sha256=sha256_file(tiny_model_path), mmproj=mmproj, mmproj_sha256=sha256_file(mmproj))
    with pytest.raises(lb.ModelLoadError, match="does not match"):
        inferd.LlamaCppBackend(tiny_model_path, **{**good, "sha256": "ab" * 32})
    with pytest.raises(lb.ModelLoadError, match="does not match"):
        inferd.LlamaCppBackend(tiny_model_path, **{**good, "mmproj_sha256": "ab" * 32})
    backend = inferd.LlamaCppBackend(tiny_model_path, n_ctx=2048, n_threads=2, **good)
    try:
        # a multimodal request: raw RGB bytes and f32 PCM, as the same pixels and samples given as arrays
        image, pcm = make_image(), make_tone()
        done = backend.describe("what is this?", [(image.tobytes(), image.shape[1], image.shape[0])], [pcm],
                                max_tokens=6)
        same = mtmd.complete(backend.ctx, backend.mctx, messages=[{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "audio", "audio": pcm},
            {"type": "text", "text": "what is this?"}]}], max_tokens=6)
        assert done.tokens == same.tokens and done.usage.prompt_tokens == same.usage.prompt_tokens
        assert done.usage.prompt_tokens > n_image_tokens() + 750

        # the consumer goes away after two chunks: the decode stops and the context is free again
        stream = backend.stream([{"role": "user", "content": "hi"}], max_tokens=100, sampler=scripted(
            backend.model.vocab, "", " hello"))
        first = [next(stream).text, next(stream).text]
        stream.close()
        assert backend.ctx.tokens.get(0)[-1] != 0 and len(first) == 2
        assert len(backend.ctx.tokens.get(0)) < 60  # prompt + the few tokens decoded, not 100

        # embeddings: task prefix, Matryoshka width, unit length, input tokens counted
        full, n_full = backend.embed(["a red car"], "search_document")
        cut, n_cut = backend.embed(["a red car"], "search_document", dimensions=16)
        query, n_query = backend.embed(["a red car"], "search_query")
        assert cut.shape == (1, 16) and np.linalg.norm(cut[0]) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(cut[0], full[0, :16] / np.linalg.norm(full[0, :16]), rtol=1e-4, atol=1e-6)
        vocab = backend.model.vocab
        assert n_full == n_cut == vocab.tokenize("search_document: a red car").size
        assert n_query == vocab.tokenize("search_query: a red car").size and not np.allclose(query, full)
        with pytest.raises(lb.InvalidInputError, match="unknown task"):
            backend.embed(["x"], "poetry")
    finally:
        backend.close()


def test_inferd_grammar_is_bounded_then_obeyed(inferd, tiny_model_path):
    backend = inferd.LlamaCppBackend(tiny_model_path, n_ctx=512, n_threads=2)
    try:
        huge = "root ::= " + " | ".join(f'"w{i}"' for i in range(2000))
        with pytest.raises(lb.InvalidInputError, match="alternatives"):
            next(backend.stream([{"role": "user", "content": "hi"}], grammar=huge))
        text = "".join(c.text for c in backend.stream([{"role": "user", "content": "hi"}],
                                                      grammar='root ::= "yes" | "no"', max_tokens=8))
        assert text in ("yes", "no")
    finally:
        backend.close()


def test_inferd_tool_calls_stream_and_stop_with_tool_use(inferd, qwen_path):
    backend = inferd.LlamaCppBackend(qwen_path, n_ctx=1024, n_threads=2)
    try:
        said = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        chunks = list(backend.stream([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                                     max_tokens=60, sampler=scripted(backend.model.vocab, said)))
        calls = [c.tool_call for c in chunks if c.tool_call is not None]
        assert chunks[-1].stop == "ToolUse" and calls[0].name == "get_weather"
        assert "".join(c.text for c in chunks) == ""  # no markup leaks into the text
        assert json.loads("".join(c.arguments for c in calls)) == {"city": "Paris"}
    finally:
        backend.close()


# -- 2. xybrid-core -----------------------------------------------------------------------------

def test_xybrid_callback_stop_patterns_and_thinking(xybrid, tiny_model_path, qwen_path):
    backend = xybrid.LlamaCppBackend()
    backend.load(tiny_model_path, n_ctx=512, n_threads=2)
    try:
        user = [{"role": "user", "content": "hi"}]
        config = xybrid.GenerationConfig(max_tokens=12, stop=["lo wor"],
                                         sampler=scripted(backend.model.vocab, "hello world and more"))
        streamed: list[str] = []
        out = backend.generate_streaming(user, config, streamed.append)
        assert out.finish_reason == "stop" and out.text == "".join(streamed) and "lo wor" not in out.text
        assert out.text.replace(" ", "").startswith("hel")

        got: list[str] = []

        def stop_after_three(text: str) -> None:
            got.append(text)
            if len(got) == 3:
                raise RuntimeError("stop")

        config = xybrid.GenerationConfig(max_tokens=30, sampler=scripted(backend.model.vocab, "", " hello"))
        out = backend.generate_streaming(user, config, stop_after_three)
        assert out.finish_reason == "cancelled" and out.text == "".join(got) and out.metrics.completion_tokens == 3
        assert str(out.error) == "stop"
    finally:
        backend.unload()

    backend.load(qwen_path, n_ctx=1024, n_threads=2)
    try:
        config = xybrid.GenerationConfig(max_tokens=40, sampler=scripted(
            backend.model.vocab, "<think>\nlet me see\n</think>\n\nParis."))
        streamed = []
        out = backend.generate_streaming([{"role": "user", "content": "Capital of France?"}], config, streamed.append)
        assert out.text == "".join(streamed) == "Paris." and out.thinking.strip() == "let me see"
    finally:
        backend.unload()


def test_xybrid_turns_reuse_the_cache_and_report_metrics(xybrid, chat_model_path):
    from llamabind.models import CHAT_MODEL_SYSTEM

    backend = xybrid.LlamaCppBackend()
    backend.load(chat_model_path, n_ctx=512, n_threads=2)
    try:
        config = xybrid.GenerationConfig(temperature=0.0, max_tokens=16)
        messages = [{"role": "system", "content": CHAT_MODEL_SYSTEM},
                    {"role": "user", "content": "What is the capital of France?"}]
        first = backend.generate(messages, config)
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Germany?"}]
        second = backend.generate(messages, config)
        assert "Paris" in first.text and "Berlin" in second.text, (first.text, second.text)
        m = second.metrics
        assert first.metrics.cached_tokens == 0 and m.cached_tokens > 20 and backend.no_prefix_reuse is None
        assert m.ttft_ms > 0 and m.prefill_tps > 0 and m.decode_tps > 0
        assert 0 < m.itl_mean_ms and m.itl_p95_ms >= m.itl_mean_ms * 0.5
    finally:
        backend.unload()


# -- 3. car-inference ---------------------------------------------------------------------------

def test_car_thinking_budget_and_left_truncation(car, qwen_path, tiny_model_path):
    backend = car.LocalBackend(qwen_path, n_ctx=1024, n_threads=2)
    try:
        vocab = backend.model.vocab
        a = backend.generate("hi", thinking=True, thinking_budget=4, max_tokens=12,
                             sampler=scripted(vocab, "<think>", " a"))
        assert a.thinking.split() == ["a"] * 4 and a.text.strip().startswith("a")
        off = backend.generate("hi", thinking=False, max_tokens=6, sampler=scripted(vocab, "", " b"))
        assert off.thinking == "" and off.text.split() == ["b"] * 6
    finally:
        backend.close()
    backend = car.LocalBackend(tiny_model_path, n_ctx=256, n_threads=2, system="Be brief.")
    try:
        a = backend.generate("hello world " * 300, max_tokens=8)
        assert a.truncated_tokens > 300 and a.finish_reason in ("stop", "length")
    finally:
        backend.close()


def test_car_rerank_classify_and_embed_with_the_chat_model(car, chat_model_path):
    from llamabind.models import CHAT_MODEL_SYSTEM

    backend = car.LocalBackend(chat_model_path, n_ctx=512, n_threads=2, system=CHAT_MODEL_SYSTEM)
    try:
        docs = ["The Eiffel Tower is in Paris.", "Paris is the capital and largest city of France.",
                "Bananas are rich in potassium."]
        ranked = backend.rerank("What is the capital of France?", docs)
        # The answer ranks first; the other two sit near a tie for a 135M model (0.50 and 0.51).
        assert ranked[0][0] == 1 and ranked[0][1] > max(s for _, s in ranked[1:]) + 0.05, ranked
        for text, want in [("I loved this movie, it was wonderful!", "positive"),
                           ("The food was cold and the waiter was rude.", "negative")]:
            label, probs = backend.classify(text, ["positive", "negative"])
            assert label == want and probs[want] > 0.6, (text, probs)
        plain = backend.embed(["capital of France"])
        asked = backend.embed(["capital of France"], instruction="Find the passage that answers")
        assert plain.shape == asked.shape and not np.allclose(plain, asked)
    finally:
        backend.close()


# -- each script as a user runs it --------------------------------------------------------------

@pytest.mark.parametrize("name", ["inferd_engine", "xybrid_core", "car_inference"])
def test_example_runs_with_the_default_chat_model(name, chat_model_path):
    out = run_main(name)
    assert "Paris" in out, out
