"""pytest-benchmark suites for llamabind's FFI hot paths.

Run: ``python -m pytest benchmarks/test_hotpaths.py --benchmark-only`` (from the repo root,
after installing llamabind). Uses the tiny random model, so compute does not hide overhead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import llamabind as lb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tinymodels import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("bench") / "tiny.gguf")
    with lb.Model(path) as m:
        yield m


@pytest.fixture
def ctx(model):
    with lb.Context(model, n_ctx=2048, n_threads=1, embeddings=False) as c:
        yield c


TEXT = "The quick brown fox jumps over the lazy dog. " * 8


def test_tokenize(benchmark, model):
    toks = benchmark(model.vocab.tokenize, TEXT)
    assert toks.size > 100


def test_detokenize_stream(benchmark, model):
    toks = [int(t) for t in model.vocab.tokenize(TEXT, add_special=False)]

    def run():
        d = model.vocab.detokenizer()
        return "".join(d.feed(t) for t in toks) + d.flush()

    assert benchmark(run).strip() == TEXT.strip()


def test_batch_fill_512(benchmark):
    toks = np.arange(512, dtype=np.int32) % 200
    b = lb.Batch(512)

    def fill():
        b.clear()
        b.add(toks, 0, 0, logits="last")

    benchmark(fill)
    assert b.n_tokens == 512


def test_decode_step(benchmark, ctx, model):
    """One single-token decode (tiny model: mostly overhead)."""
    b = lb.Batch(1)
    state = {"pos": 0}

    def step():
        if state["pos"] >= 2000:
            ctx.memory.clear()
            state["pos"] = 0
        b.clear()
        b.add([5], state["pos"], 0)
        ctx.decode(b)
        state["pos"] += 1

    benchmark(step)


def test_sample_greedy(benchmark, ctx, model):
    b = lb.Batch(8)
    b.add(model.vocab.tokenize("hello"), 0, 0)
    ctx.decode(b)
    s = lb.Sampler.greedy()
    tok = benchmark(s.sample, ctx, -1)
    assert 0 <= tok < model.vocab.n_tokens


def test_logits_view(benchmark, ctx, model):
    b = lb.Batch(8)
    b.add(model.vocab.tokenize("hello"), 0, 0)
    ctx.decode(b)
    row = benchmark(ctx.logits, -1)
    assert row.shape == (model.vocab.n_tokens,)


def test_generate_per_token(benchmark, ctx, model):
    """The full decode loop (events, UTF-8, stop strings) for 64 tokens."""

    def run():
        n = 0
        for ev in lb.generate(ctx, [1], max_tokens=64, reuse_cache=False, ignore_eog=True, stop=["zzzz"]):
            n += 1
        return n

    assert benchmark(run) >= 64


def test_embedding_read(benchmark, model):
    with lb.Context(model, n_ctx=512, n_threads=1, embeddings=True, pooling="mean") as ectx:
        b = lb.Batch(64)
        b.add(model.vocab.tokenize("hello world"), 0, 0, logits="all")
        ectx.decode(b)
        vec = benchmark(ectx.embeddings_seq, 0)
        assert vec.shape == (model.n_embd,)
