"""Regression tests for API mistakes that used to kill the interpreter (SIGABRT/SIGSEGV) or lose
work. Each runs in a fresh interpreter, so a crash fails its own test with the signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import gc, sys, threading, time, weakref
import numpy as np
import llamabind as lb
from llamabind import InvalidInputError, LlamaError
model = lb.Model(sys.argv[1])
ctx = lb.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_seq_max=2, n_threads=1)
def refused(fn, exc=LlamaError, match=""):
    try:
        fn()
    except exc as e:
        assert match in str(e), (match, str(e))
        return str(e)
    raise AssertionError("not refused")
def prompt_logits():
    ctx.memory.clear(); b = lb.Batch(8); b.add(model.vocab.tokenize("hello world"), 0, 0); ctx.decode(b)
"""


def run_isolated(model_path: str, body: str, prelude: str = PRELUDE, env: dict | None = None) -> str:
    """Run ``prelude`` + ``body`` in a fresh interpreter; it must exit 0 having printed OK."""
    code = prelude + textwrap.dedent(body) + "\nprint('OK', flush=True)\n"
    p = subprocess.run([sys.executable, "-c", code, model_path], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "OK" in p.stdout.split(), p.stdout
    return p.stdout


CASES = {
    "chain_without_selector": """
        prompt_logits()
        s = lb.Sampler.chain(lb.Sampler.top_k(40))
        refused(lambda: s.sample(ctx), InvalidInputError, "selected no token")
        assert isinstance(lb.Sampler.chain(lb.Sampler.top_k(4), lb.Sampler.dist(1)).sample(ctx), int)
    """,
    "python_sampler_raises_or_only_edits": """
        prompt_logits()
        class Boom(lb.PySampler):
            def apply(self, cur): raise KeyError("mine")
        class Edit(lb.PySampler):
            def apply(self, cur): cur.data["logit"] *= 0.5
        refused(lambda: Boom().as_sampler().sample(ctx), KeyError, "mine")
        refused(lambda: Edit().as_sampler().sample(ctx), InvalidInputError, "selected no token")
        assert isinstance(lb.Sampler.chain(Edit().as_sampler(), lb.Sampler.greedy()).sample(ctx), int)
    """,
    "python_sampler_selects_foreign_id": """
        prompt_logits()
        class Bad(lb.PySampler):
            def apply(self, cur):
                cur.data["id"][0] = 10**6
                cur.selected = 0
        refused(lambda: Bad().as_sampler().sample(ctx), InvalidInputError, "outside the vocabulary")
    """,
    "memory_shift_all_sequences": """
        refused(lambda: ctx.memory.seq_add(-1, 0, -1, 2), InvalidInputError, "out of range")
        refused(lambda: ctx.memory.seq_div(-1, 0, -1, 2), InvalidInputError, "out of range")
        refused(lambda: ctx.memory.seq_rm(0, 5, 2), InvalidInputError, "reversed")
    """,
    "partial_seq_cp_on_split_cache": """
        prompt_logits()
        refused(lambda: ctx.memory.seq_cp(0, 1, 0, 3), InvalidInputError, "kv_unified")
        ctx.memory.seq_cp(0, 1)  # whole sequences are fine
        u = lb.Context(model, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1, kv_unified=True)
        u.memory.seq_cp(0, 1, 0, 3)
    """,
    "vocab_ids_out_of_range": """
        v = model.vocab
        for bad in (-1, v.n_tokens, 2**31 - 1):
            for fn in (v.is_control, v.is_eog, v.text, v.token_to_piece):
                refused(lambda: fn(bad), InvalidInputError, "out of range")
            refused(lambda: v.detokenize([bad]), InvalidInputError, "out of range")
    """,
    "grammar_accept_rejected_eog_and_foreign_tokens": """
        v = model.vocab
        g = lb.Sampler.grammar(v, 'root ::= "a" "b"')
        eog = v.eos if v.eos is not None else v.eot
        refused(lambda: g.accept(eog), InvalidInputError, "does not accept")
        refused(lambda: g.accept(v.n_tokens + 3), InvalidInputError, "out of range")
        refused(lambda: g.accept(-5), InvalidInputError, "out of range")
        z = v.tokenize("z", add_special=False)[0]
        refused(lambda: g.accept(int(z)), InvalidInputError, "does not accept")
        chain = lb.Sampler.chain(lb.Sampler.grammar(v, 'root ::= "a"'), lb.Sampler.greedy())
        refused(lambda: chain.accept(int(z)), InvalidInputError, "does not accept")
    """,
    "lazy_grammar_bad_regex_and_failing_trigger": """
        v = model.vocab
        refused(lambda: lb.Sampler.grammar_lazy(v, 'root ::= "a"', trigger_patterns=["(unclosed"]),
                InvalidInputError)
        g = lb.Sampler.grammar_lazy(v, 'root ::= "q"', trigger_patterns=["x"])
        *lead, x = [int(t) for t in v.tokenize("x", add_special=False)]
        for t in lead:
            g.accept(t)
        refused(lambda: g.accept(x), InvalidInputError, "empty grammar stack")  # llama.cpp threw: caught
        refused(lambda: g.accept(x), InvalidInputError, "reset()")
        g.reset()
    """,
    "close_context_and_model_from_another_thread_mid_decode": """
        big = lb.Context(model, n_ctx=2048, n_batch=2048, n_ubatch=512, n_threads=1)
        toks = np.resize(model.vocab.tokenize("the quick brown fox"), 2000)
        errors = []
        def work():
            try:
                for _ in range(50):
                    b = lb.Batch(2048); b.add(toks, 0, 0); big.decode(b); big.memory.clear()
            except LlamaError as e:
                errors.append(e)
        t = threading.Thread(target=work); t.start(); time.sleep(0.05)
        big.close(); t.join()
        assert errors and isinstance(errors[0], LlamaError)
        t = threading.Thread(target=lambda: [lb.complete(ctx, "hello", max_tokens=40, ignore_eog=True)
                                             for _ in range(20)])
        t.start(); time.sleep(0.05); model.close(); t.join()
        assert ctx.closed
    """,
    "encode_or_noncausal_beyond_n_ubatch": """
        b = lb.Batch(64); b.add(np.resize(model.vocab.tokenize("hi there"), 40), 0, 0)
        refused(lambda: ctx.encode(b), InvalidInputError, "no encoder")
        ctx.set_causal_attn(False)
        refused(lambda: ctx.decode(b), InvalidInputError, "n_ubatch")
        ctx.set_causal_attn(True)
        ctx.decode(b)
    """,
    "generate_after_without_logits": """
        b = lb.Batch(8); b.add(model.vocab.tokenize("hello"), 0, 0, logits=False); ctx.decode(b)
        s = lb.Sampler.chain(lb.Sampler.top_k(5), lb.Sampler.dist(3))
        refused(lambda: list(lb.generate_after(ctx, 2, sampler=s)), InvalidInputError, "without logits")
    """,
    "outputs_outlive_close_and_next_decode": """
        e = lb.Context(model, n_ctx=128, n_threads=1, embeddings=True, pooling="mean")
        b = lb.Batch(8); b.add(model.vocab.tokenize("hello"), 0, 0, logits="all"); e.decode(b)
        row, pooled = e.embeddings(-1), e.embeddings_seq(0)
        refused(lambda: e.embeddings_seq(0, 10**6), InvalidInputError, "out of range")
        prompt_logits(); lg = ctx.logits(-1); copy = lg.copy()
        e.close(); prompt_logits()
        assert float(row.sum() + pooled.sum()) == float(row.sum() + pooled.sum())
        assert np.array_equal(lg, copy)
    """,
    "batch_arrays_cannot_be_rebound": """
        b = lb.Batch(4)
        refused(lambda: setattr(b, "token", np.zeros(100, np.int32)), AttributeError)
        refused(lambda: setattr(b, "n_tokens", 10**6), InvalidInputError, "n_tokens")
    """,
    "lora_and_sampler_len": """
        assert len(lb.Sampler.chain(lb.Sampler.greedy())) == 1
        refused(lambda: len(lb.Sampler.greedy()), TypeError)
        assert bool(lb.Sampler.top_k(3))
        refused(lambda: lb.Sampler.top_k(3).add(lb.Sampler.greedy()), InvalidInputError, "chain")
        refused(lambda: lb.Sampler.greedy().apply(np.zeros(0, lb.sampler.TOKEN_DATA)), InvalidInputError)
    """,
    "kv_full_mid_generation_keeps_the_text": """
        small = lb.Context(model, n_ctx=32, n_batch=32, n_threads=1)
        events = []
        try:
            for ev in lb.generate(small, "hello world", max_tokens=100, ignore_eog=True):
                events.append(ev)
            done = events[-1]
            assert done.finish_reason == "length" and done.tokens
        except LlamaError as e:
            done = e.done[0]
            assert done.finish_reason == "error" and done.error is e and done.tokens
    """,
    "abort_callback_exception_reaches_the_caller": """
        def cb(): raise ZeroDivisionError("from my callback")
        ctx.set_abort_callback(cb)
        refused(prompt_logits, ZeroDivisionError, "from my callback")
        ctx.set_abort_callback(None)
        prompt_logits()
    """,
    "dropping_the_last_reference_frees_without_gc": """
        gc.disable()
        m = lb.Model(sys.argv[1]); c = lb.Context(m, n_ctx=64, n_threads=1)
        v = m.vocab; mem = c.memory
        fm, fc = m._finalizer, c._finalizer
        del m, c, v, mem
        assert not fm.alive and not fc.alive
    """,
    "library_prints_nothing_without_logging_config": """
        import io, contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            lb.Context(model, n_ctx=64, n_threads=1, flash_attn=True)
            refused(lambda: lb.Sampler.grammar(model.vocab, "root ::= ("), InvalidInputError)
        assert err.getvalue() == "", err.getvalue()
    """,
    # -- found by tests/fuzz_api.py --------------------------------------------------------------
    "grammar_sampler_after_its_model_closed": """
        m2 = lb.Model(sys.argv[1])
        g = lb.Sampler.grammar(m2.vocab, "root ::= [a-z]+")
        chain = lb.Sampler.chain(lb.Sampler.grammar(m2.vocab, "root ::= [a-z]+"), lb.Sampler.greedy())
        m2.close(); gc.collect()
        refused(lambda: g.accept(70), lb.ClosedError)
        refused(lambda: chain.accept(70), lb.ClosedError)
    """,
    "cloned_grammar_accepts_eog": """
        v = model.vocab
        eog = v.eos if v.eos is not None else v.eot
        refused(lambda: lb.Sampler.grammar(v, 'root ::= "a"').clone().accept(eog), InvalidInputError, "does not accept")
        c = lb.Sampler.chain(lb.Sampler.grammar(v, 'root ::= "a"'), lb.Sampler.greedy()).clone()
        refused(lambda: c.accept(eog), InvalidInputError, "does not accept")
    """,
    "generation_under_noncausal_attention": """
        ctx.set_causal_attn(False)
        refused(lambda: lb.complete(ctx, "x" * 50, max_tokens=2), InvalidInputError, "causal")
        ctx.set_causal_attn(True)
    """,
    "python_sampler_closes_its_chain": """
        prompt_logits()
        class C(lb.PySampler):
            def apply(self, cur): chain.close()
        chain = lb.Sampler.chain(C().as_sampler(), lb.Sampler.greedy())
        refused(lambda: chain.sample(ctx), lb.BusyError)
        assert not chain.closed
    """,
    "batch_array_retyped_in_place": """
        ctx.memory.clear()
        b = lb.Batch(4); b.add([5], 0)
        b.n_seq_id.dtype = np.uint8          # re-types the view only: the checks read what C reads
        b.n_seq_id[0:4] = [1, 0, 0, 16]      # one int32 of 0x10000001
        refused(lambda: ctx.decode(b), InvalidInputError, "n_seq_id")
    """,
    "sampler_closed_from_another_thread_while_sampling": """
        prompt_logits()
        class Slow(lb.PySampler):
            def apply(self, cur): time.sleep(0.05)
        chain = lb.Sampler.chain(Slow().as_sampler(), lb.Sampler.greedy())
        t = threading.Thread(target=lambda: chain.sample(ctx)); t.start(); time.sleep(0.01)
        chain.close(); t.join()
        assert chain.closed
    """,
    "context_over_vocab_only_model": """
        v = lb.Model(sys.argv[1], vocab_only=True)
        refused(lambda: lb.Context(v, n_ctx=64, n_threads=1), InvalidInputError, "vocab_only")
    """,
    "one_sampler_shared_by_two_threads": """
        c2 = lb.Context(model, n_ctx=256, n_threads=1)
        chain = lb.Sampler.chain(lb.Sampler.grammar(model.vocab, 'root ::= [a-z]+ " " [a-z]+'), lb.Sampler.dist(1))
        def work(c):
            for _ in range(10):
                try:
                    lb.complete(c, "hello", max_tokens=20, sampler=chain, reuse_cache=False)
                except LlamaError:
                    pass
        ts = [threading.Thread(target=work, args=(c,)) for c in (ctx, c2)]
        [t.start() for t in ts]; [t.join() for t in ts]
    """,
    "python_sampler_keeps_its_candidates": """
        class K(lb.PySampler):
            def apply(self, cur):
                self.cur = cur
                cur.selected = 0
        k = K(); s = k.as_sampler()
        a = np.zeros(8, lb.sampler.TOKEN_DATA); a["id"] = np.arange(8)
        s.apply(a); del a; gc.collect()
        k.cur.data["logit"][:] = 1.0  # its own copy: the freed C array is not touched
        assert k.cur.data["id"].tolist() == list(range(8))
    """,
    "deeply_nested_grammar_and_trigger": """
        refused(lambda: lb.Sampler.grammar(model.vocab, "root ::= " + "(" * 100000 + '"a"' + ")" * 100000),
                InvalidInputError, "nests deeper")
        refused(lambda: lb.Sampler.grammar_lazy(model.vocab, 'root ::= "a"',
                                                trigger_patterns=["(" * 50000 + "a" + ")" * 50000]),
                InvalidInputError, "nests deeper")
    """,
    "ints_beyond_int32": """
        refused(lambda: model.vocab.detokenize([2**40]), InvalidInputError)
        refused(lambda: lb.Sampler.greedy().accept(2**31), InvalidInputError)
        refused(lambda: lb.Batch(4).add([5], 0, 2**40), InvalidInputError)
        refused(lambda: lb.Batch(4).add([2**40], 0), InvalidInputError)
        refused(lambda: ctx.memory.seq_rm(0, 2**40), InvalidInputError)
    """,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_crash(tiny_model_path, name):
    run_isolated(tiny_model_path, CASES[name])


def test_two_generations_on_one_context_never_interleave(tiny_model_path):
    run_isolated(tiny_model_path, """
        g1 = lb.generate(ctx, "hello", max_tokens=5); next(g1)
        out = []
        t = threading.Thread(target=lambda: out.append(refused(lambda: next(lb.generate(ctx, "x")), lb.BusyError)))
        t.start(); t.join()
        b = lb.Batch(4); b.add([1], 0, 1)
        t = threading.Thread(target=lambda: out.append(refused(lambda: ctx.decode(b), lb.BusyError)))
        t.start(); t.join()
        assert len(out) == 2
        list(g1)
    """)
