"""Model, vocab, context, batch, sampler and memory handles: behaviour, lifetimes and bad input."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import llamabind as lb


# -- model ---------------------------------------------------------------------------------

def test_model_facts(gemma_model):
    m = gemma_model
    assert m.architecture == "gemma3"
    assert m.n_layer == 18 and m.n_embd == 640 and m.n_ctx_train == 32768
    assert 200e6 < m.n_params < 300e6 and m.size > 100e6
    assert "gemma3" in m.description
    assert m.metadata["general.architecture"] == "gemma3"
    assert m.chat_template() is None  # this GGUF ships none: the built-in "gemma" one is used
    assert m._builtin_template() == "gemma"
    assert not m.is_recurrent and not m.is_hybrid and m.has_decoder and not m.has_encoder


def test_model_progress_callback_and_cancel(gemma_path):
    seen = []
    with lb.Model(gemma_path, progress=lambda f: seen.append(f)) as m:
        assert m.n_layer == 18
    assert seen and seen[-1] == pytest.approx(1.0)
    with pytest.raises(lb.ModelLoadError, match="cancel"):
        lb.Model(gemma_path, progress=lambda f: False)


def test_model_progress_exception_is_reported(tiny_model_path):
    def boom(_):
        raise RuntimeError("stop it")
    with pytest.raises(lb.ModelLoadError, match="stop it"):
        lb.Model(tiny_model_path, progress=boom)


def test_model_sha256(tiny_model_path):
    from llamabind.model import sha256_file
    good = sha256_file(tiny_model_path)
    lb.Model(tiny_model_path, sha256=good).close()
    with pytest.raises(lb.ModelLoadError, match="does not match"):
        lb.Model(tiny_model_path, sha256="0" * 64)


@pytest.mark.parametrize("make", ["missing", "directory", "empty", "text", "truncated"])
def test_bad_model_files_raise(tmp_path, tiny_model_path, make):
    p = tmp_path / "bad.gguf"
    if make == "missing":
        exc = lb.ModelNotFoundError
    elif make == "directory":
        p.mkdir()
        exc = lb.ModelLoadError
    elif make == "empty":
        p.write_bytes(b"")
        exc = lb.ModelLoadError
    elif make == "text":
        p.write_text("this is not a model\n" * 100)
        exc = lb.ModelLoadError
    else:
        data = open(tiny_model_path, "rb").read()
        p.write_bytes(data[: len(data) * 2 // 3])
        exc = lb.ModelLoadError
    with pytest.raises(exc):
        lb.Model(p)


def test_unknown_model_param_is_refused(tiny_model_path):
    with pytest.raises(TypeError, match="unknown"):
        lb.Model(tiny_model_path, n_gpu_layerz=3)


# -- vocab ---------------------------------------------------------------------------------

def test_tokenize_roundtrip(gemma_model):
    v = gemma_model.vocab
    text = "Hello, wörld! 你好 🙂"
    toks = v.tokenize(text, add_special=False)
    assert toks.dtype == np.int32 and toks.size > 3
    assert v.detokenize(toks) == text
    with_bos = v.tokenize(text)
    assert with_bos[0] == v.bos and with_bos.size == toks.size + 1
    assert v.tokenize("<start_of_turn>", add_special=False, parse_special=True).size == 1
    assert v.tokenize("<start_of_turn>", add_special=False, parse_special=False).size > 1
    assert v.is_eog(v.eos) and not v.is_eog(int(toks[0]))
    assert len(v) == v.n_tokens == 262144


def test_incremental_detokenizer_never_splits_characters(gemma_model):
    v = gemma_model.vocab
    text = "🙂🙃 café ñ 你好世界"
    toks = v.tokenize(text, add_special=False)
    d = v.detokenizer()
    parts = [d.feed(int(t)) for t in toks] + [d.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)
    # a character split over byte tokens comes out whole, once, with the token that completes it
    byte_tok = gemma_model.vocab.tokenize("\U0001fae8", add_special=False)  # rare emoji: byte fallback
    d = v.detokenizer()
    pieces = [d.feed(int(t)) for t in byte_tok]
    assert len(byte_tok) == 4 and pieces == ["", "", "", "\U0001fae8"]


def test_invalid_text_and_tokens(gemma_model):
    v = gemma_model.vocab
    with pytest.raises(lb.InvalidInputError, match="UTF-8"):
        v.tokenize("bad \udcff surrogate")
    assert v.detokenize(v.tokenize(b"\xff\xfe invalid bytes", add_special=False)).endswith("invalid bytes")
    for bad in ([-1], [v.n_tokens], [0, 10**9]):
        with pytest.raises(lb.InvalidInputError, match="out of range"):
            v.detokenize(bad)
    with pytest.raises(lb.InvalidInputError):
        v.token_to_piece(-5)
    with pytest.raises(lb.InvalidInputError):
        v.tokenize(123)


# -- context, batch, memory ------------------------------------------------------------------

def test_context_params_and_enums(gemma_model):
    with lb.Context(gemma_model, n_ctx=512, n_batch=256, n_ubatch=128, n_seq_max=2, n_threads=1,
                    type_k="q8_0", type_v="f16", flash_attn=True) as ctx:
        assert (ctx.n_ctx, ctx.n_batch, ctx.n_ubatch, ctx.n_seq_max) == (512, 256, 128, 2)
        assert ctx.n_threads == 1
    with pytest.raises(ValueError, match="pooling_type"):
        lb.Context(gemma_model, pooling="bogus")
    with pytest.raises(TypeError, match="unknown"):
        lb.Context(gemma_model, n_ctxx=5)
    with pytest.raises(TypeError, match="pointer"):
        lb.Context(gemma_model, abort_callback=None)


def test_decode_and_logits_view(gemma_ctx):
    v = gemma_ctx.vocab
    toks = v.tokenize("The capital of France is")
    b = lb.Batch(64)
    b.add(toks, 0, 0, logits="last")
    gemma_ctx.decode(b)
    logits = gemma_ctx.logits(len(toks) - 1)
    assert logits.shape == (v.n_tokens,) and logits.dtype == np.float32
    assert logits.flags.owndata  # its own memory: llama.cpp reuses its buffer at the next decode
    kept = logits.copy()
    assert np.array_equal(logits, gemma_ctx.logits(-1))
    with pytest.raises(lb.InvalidInputError, match="no logits"):
        gemma_ctx.logits(0)  # row 0 did not ask for logits
    b2 = lb.Batch(8)
    b2.add(v.tokenize(" Paris", add_special=False), len(toks), 0)
    gemma_ctx.decode(b2)
    assert np.array_equal(logits, kept)  # unchanged by the next decode
    assert v.token_to_piece(int(np.argmax(logits))).strip() != b""


def test_batch_validation(gemma_ctx):
    v = gemma_ctx.vocab
    b = lb.Batch(8)
    with pytest.raises(lb.InvalidInputError, match="overflow"):
        b.add(np.zeros(9, np.int32), 0)
    with pytest.raises(lb.InvalidInputError, match="empty"):
        gemma_ctx.decode(lb.Batch(4))
    b.add([v.n_tokens + 5], 0)
    with pytest.raises(lb.InvalidInputError, match="out of range"):
        gemma_ctx.decode(b)
    b2 = lb.Batch(4, n_seq_max=2)
    b2.add([5, 6], 0, seq_id=1)
    with pytest.raises(lb.InvalidInputError, match="sequence id"):
        gemma_ctx.decode(b2)  # the context has n_seq_max=1
    big = lb.Batch(4096)
    big.add(np.full(3000, 5, np.int32), 0)
    with pytest.raises(lb.InvalidInputError, match="n_batch"):
        gemma_ctx.decode(big)


def test_prompt_longer_than_context(gemma_model):
    with lb.Context(gemma_model, n_ctx=256, n_threads=1) as ctx:
        with pytest.raises(lb.ContextOverflowError):
            next(lb.generate(ctx, "word " * 400))
        with pytest.raises(lb.InvalidInputError, match="empty"):
            lb.generate(ctx, "", add_special=False)
        assert lb.complete(ctx, "still works", max_tokens=2).usage.completion_tokens == 2


def test_generation_stops_at_context_end(gemma_model):
    with lb.Context(gemma_model, n_ctx=256, n_threads=2) as ctx:
        prompt = "one two " * 60
        n = ctx.vocab.tokenize(prompt).size
        done = lb.complete(ctx, prompt, max_tokens=1000)
        assert done.finish_reason in ("length", "stop")
        assert n + done.usage.completion_tokens <= ctx.n_ctx_seq + 1


def test_memory_ops(gemma_ctx):
    lb.complete(gemma_ctx, "A B C D E F G", max_tokens=3, reuse_cache=False)
    mem = gemma_ctx.memory
    hi = mem.seq_pos_max(0)
    assert mem.seq_pos_min(0) == 0 and hi > 5
    assert mem.seq_rm(0, 4, -1)
    assert mem.seq_pos_max(0) == 3
    with pytest.raises(lb.InvalidInputError):
        mem.seq_cp(0, 5)
    with pytest.raises(lb.InvalidInputError):
        mem.seq_pos_max(7)
    assert mem.can_shift
    mem.seq_add(0, 0, -1, 2)
    assert mem.seq_pos_max(0) == 5
    mem.clear()
    assert mem.seq_pos_max(0) == -1


# -- samplers ------------------------------------------------------------------------------

def test_every_builtin_sampler_constructs(gemma_model):
    v = gemma_model.vocab
    made = [
        lb.Sampler.greedy(), lb.Sampler.dist(1), lb.Sampler.top_k(10), lb.Sampler.top_p(0.9),
        lb.Sampler.min_p(0.05), lb.Sampler.typical(0.9), lb.Sampler.temp(0.7), lb.Sampler.temp_ext(0.7, 0.1, 1.0),
        lb.Sampler.xtc(0.1, 0.5), lb.Sampler.top_n_sigma(1.0), lb.Sampler.mirostat(v.n_tokens, 1),
        lb.Sampler.mirostat_v2(1), lb.Sampler.penalties(64, 1.1), lb.Sampler.dry(v, gemma_model.n_ctx_train),
        lb.Sampler.grammar(v, 'root ::= "a"'), lb.Sampler.logit_bias(v.n_tokens, {5: -1.0}),
        lb.Sampler.infill(v), lb.Sampler.adaptive_p(0.5, 0.9, 1),
        lb.Sampler.grammar_lazy(v, 'root ::= "a"', trigger_patterns=["x"]),
    ]
    assert all(not s.closed for s in made)
    chain = lb.Sampler.chain(*made[2:5], lb.Sampler.dist(3))
    assert len(chain) == 4 and all(s.closed for s in made[2:5])  # owned by the chain now
    for s in made:
        s.close()
    chain.close()


def test_bad_grammar_raises(gemma_model):
    with pytest.raises(lb.InvalidInputError, match="grammar"):
        lb.Sampler.grammar(gemma_model.vocab, "root ::= (((")
    with pytest.raises(lb.InvalidInputError):
        lb.Sampler.grammar(gemma_model.vocab, "")


def test_python_sampler(gemma_ctx):
    banned = int(gemma_ctx.vocab.tokenize(" Paris", add_special=False)[0])

    class Ban(lb.PySampler):
        name = "ban"

        def __init__(self):
            self.accepted = []

        def apply(self, cur):
            cur.data["logit"][cur.data["id"] == banned] = -np.inf

        def accept(self, token):
            self.accepted.append(token)

    ban = Ban()
    chain = lb.Sampler.chain(ban.as_sampler(), lb.Sampler.greedy())
    done = lb.complete(gemma_ctx, "The capital of France is", max_tokens=5, sampler=chain)
    assert banned not in done.tokens
    assert ban.accepted[: len(done.tokens)] == done.tokens


# -- lifetimes -----------------------------------------------------------------------------

def test_closed_handles_raise(tiny_model_path):
    m = lb.Model(tiny_model_path)
    ctx = lb.Context(m, n_ctx=128, n_threads=1)
    s = lb.Sampler.greedy()
    m.close()  # closes the context first
    assert ctx.closed and m.closed
    with pytest.raises(lb.ClosedError):
        ctx.decode(lb.Batch(1))
    with pytest.raises(lb.ClosedError):
        m.vocab.tokenize("x")
    with pytest.raises(lb.ClosedError):
        _ = m.n_layer
    s.close()
    s.close()  # idempotent
    with pytest.raises(lb.ClosedError):
        s.reset()


def test_model_kept_alive_by_context(tiny_model_path):
    ctx = lb.Context(lb.Model(tiny_model_path), n_ctx=128, n_threads=1)
    gc.collect()
    assert not ctx.model.closed
    assert lb.complete(ctx, "hi", max_tokens=2, ignore_eog=True).usage.completion_tokens == 2


def test_interpreter_exit_frees_children_first(tiny_model_path):
    """Handles left open at exit are freed by finalizers (context before model), without a crash."""
    code = ("import llamabind as lb\n"
            f"m = lb.Model({str(tiny_model_path)!r})\n"
            "c = lb.Context(m, n_ctx=128, n_threads=1)\n"
            "s = lb.Sampler.chain(lb.Sampler.greedy())\n"
            "g = lb.generate(c, 'hi', max_tokens=3); next(g)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_no_leak_creating_and_freeing_handles(tiny_model):
    def cycle():
        for _ in range(40):
            with lb.Context(tiny_model, n_ctx=128, n_threads=1):
                pass
        for _ in range(200):
            b = lb.Batch(64)
            b.add([1, 2, 3], 0)
            with lb.Sampler.from_params(tiny_model.vocab, temperature=0.7, seed=1):
                pass
    cycle()  # warm up allocators
    gc.collect()
    before = _rss_kb()
    for _ in range(5):  # 200 contexts, 1000 batches and samplers
        cycle()
    gc.collect()
    grown = _rss_kb() - before
    assert grown < 20_000, f"RSS grew by {grown} kB"


def test_lora_apply_scale_and_remove(tiny_model, tmp_path):
    from tinymodels import write_tiny_lora

    adapter = tiny_model.load_lora(write_tiny_lora(tmp_path / "lora.gguf"))
    toks = tiny_model.vocab.tokenize("hello")

    def last_logits(ctx):
        ctx.memory.clear()
        b = lb.Batch(16)
        b.add(toks, 0)
        ctx.decode(b)
        return ctx.logits(-1).copy()

    with lb.Context(tiny_model, n_ctx=128, n_threads=1) as ctx:
        base = last_logits(ctx)
        ctx.set_loras({adapter: 1.0})
        full = last_logits(ctx)
        ctx.set_loras({adapter: 0.5})
        half = last_logits(ctx)
        ctx.set_loras({})
        again = last_logits(ctx)
    assert not np.allclose(base, full, atol=1e-3) and not np.allclose(full, half, atol=1e-3)
    assert np.allclose(base, again, atol=1e-5)
    with pytest.raises(lb.ModelLoadError):
        tiny_model.load_lora(tmp_path / "missing.gguf")
    adapter.close()


def test_state_file_roundtrip(tiny_model, tmp_path):
    with lb.Context(tiny_model, n_ctx=128, n_threads=1) as ctx:
        ref = lb.complete(ctx, "hello world", max_tokens=8, reuse_cache=False).tokens
        lb.complete(ctx, "hello world", max_tokens=1, reuse_cache=False)
        ctx.state_save_file(tmp_path / "s.bin")
        ctx.memory.clear()
        saved = ctx.state_load_file(tmp_path / "s.bin")
        assert saved.size == ctx.vocab.tokenize("hello world").size
        again = lb.complete(ctx, "hello world", max_tokens=8)
        assert again.usage.cached_tokens == saved.size - 1 and again.tokens == ref
        with pytest.raises(FileNotFoundError):
            ctx.state_load_file(tmp_path / "nope.bin")
        (tmp_path / "junk.bin").write_bytes(b"junk" * 10)
        with pytest.raises(lb.InvalidInputError):
            ctx.state_load_file(tmp_path / "junk.bin")


@pytest.mark.parametrize("params", [dict(n_batch=128, n_seq_max=256),
                                    dict(embeddings=True, pooling="mean", n_ubatch=512, n_seq_max=3)])
def test_context_shapes_llama_cpp_would_abort_on(tiny_model, params):
    with pytest.raises(lb.InvalidInputError):
        lb.Context(tiny_model, n_ctx=1024, n_threads=1, **params)
