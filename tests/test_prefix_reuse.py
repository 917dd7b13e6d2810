"""KV-prefix reuse equals a cold start fed the same chunks, for full and sliding-window caches.

llama.cpp's CPU kernels differ by batch size, so the reference replays exactly the decodes the
warm run made (same chunk boundaries), by hand through the raw Context API, independent of
``generate``'s reuse logic; only then may tokens be compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import llamabind as lb


def _decode_chunks(ctx: lb.Context, chunks: list[np.ndarray], pos: int = 0) -> int:
    b = lb.Batch(ctx.n_batch)
    for c in chunks:
        for i in range(0, c.size, ctx.n_batch):
            part = c[i:i + ctx.n_batch]
            b.clear()
            b.add(part, pos, 0, logits="last")
            ctx.decode(b)
            pos += part.size
    return pos


def _greedy(ctx: lb.Context, pos: int, n: int) -> list[int]:
    """Greedy tokens from the last logits, decoding one token per step (as generate does)."""
    out, b = [], lb.Batch(1)
    eog = ctx.vocab.is_eog
    for _ in range(n):
        tok = int(np.argmax(ctx.logits(-1)))
        if eog(tok):
            break
        out.append(tok)
        if len(out) == n:
            break
        b.clear()
        b.add([tok], pos, 0)
        ctx.decode(b)
        pos += 1
    return out


def reference(ctx: lb.Context, history: list[list[int]], keep: int, prompt: np.ndarray, n: int) -> list[int]:
    """Cold start: replay ``history`` (the warm run's decodes, chunk by chunk), keep ``keep``
    positions, decode the rest of ``prompt``, then greedy for ``n`` tokens."""
    ctx.memory.clear()
    _decode_chunks(ctx, [np.asarray(h, np.int32) for h in history])
    assert ctx.memory.seq_rm(0, keep, -1)
    pos = _decode_chunks(ctx, [prompt[keep:]], keep)
    out = _greedy(ctx, pos, n)
    ctx.memory.clear()
    return out


def _text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["river", "stone", "light", "market", "winter", "garden", "letter", "engine", "harbor", "cloud"]
    return " ".join(rng.choice(words, n_words))


def _first_run_history(prompt: np.ndarray, done: lb.DoneEvent, n_batch: int) -> list[list[int]]:
    """The decodes a generation made: the prompt in n_batch chunks, then each generated token
    but the last (sampled, never decoded)."""
    chunks = [prompt[i:i + n_batch].tolist() for i in range(0, prompt.size, n_batch)]
    return chunks + [[t] for t in done.tokens[:-1]]


@pytest.mark.parametrize("swa_full", [True, False])
@pytest.mark.parametrize("shared", ["append", 900, 300, 100])
def test_reuse_equals_equally_chunked_cold_start(gemma_model, swa_full, shared):
    """gemma3-270m (window 512): a 1121-token conversation, then prompts that branch from it
    at several points. Reuse keeps only what the cache really still holds."""
    with lb.Context(gemma_model, n_ctx=2048, n_batch=512, n_threads=2, swa_full=swa_full) as ctx:
        first = ctx.vocab.tokenize(_text(1121 * 2, 1))[:1121]
        assert first.size == 1121
        done1 = lb.complete(ctx, first, max_tokens=3, ignore_eog=True)
        history = _first_run_history(first, done1, ctx.n_batch)
        if shared == "append":
            second = np.concatenate([first, np.asarray(done1.tokens[:-1], np.int32),
                                     ctx.vocab.tokenize(" and then " + _text(40, 2), add_special=False)])
        else:
            second = np.concatenate([first[:shared], ctx.vocab.tokenize(" " + _text(60, 3), add_special=False)])
        warm = lb.complete(ctx, second, max_tokens=8, ignore_eog=True)
        keep = warm.usage.cached_tokens
        if shared == "append":
            assert keep == first.size + len(done1.tokens) - 1  # the whole conversation is reused
        elif not swa_full and shared < 512:
            assert keep == 0  # the cache dropped the window behind the branch point: no reuse
        elif swa_full:
            assert keep >= shared
        cold = reference(ctx, history if keep else [], keep, second, 8)
        assert warm.tokens == cold


def test_reuse_on_a_full_cache_at_branch_points(tiny_model_path):
    """The tiny llama (no window): branch after 5, 40 and 63 tokens of a 64-token history."""
    with lb.Model(tiny_model_path) as m, lb.Context(m, n_ctx=256, n_batch=32, n_threads=1) as ctx:
        first = np.arange(1, 65, dtype=np.int32) % (m.vocab.n_tokens - 2) + 1
        for branch in (5, 40, 63):
            done1 = lb.complete(ctx, first, max_tokens=4, ignore_eog=True)
            history = _first_run_history(first, done1, ctx.n_batch)
            tail = (np.arange(23, dtype=np.int32) * 7 + 150) % (m.vocab.n_tokens - 2) + 1
            second = np.concatenate([first[:branch], tail])
            warm = lb.complete(ctx, second, max_tokens=6, ignore_eog=True)
            assert warm.usage.cached_tokens == branch
            assert warm.tokens == reference(ctx, history, branch, second, 6)
