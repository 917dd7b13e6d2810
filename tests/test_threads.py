"""Threads, callbacks and interpreter exit: each finding of the concurrency review, by name, in a
fresh interpreter (a crash fails its own test with the signal). Freed memory is poisoned
(MALLOC_PERTURB_), so an array that still points into it reads garbage instead of passing."""

from __future__ import annotations

import os

import pytest

from test_hardening import run_isolated

PRELUDE = """
import gc, sys, threading, time
import numpy as np
import llamabind as lb
from llamabind import BusyError, ClosedError, InvalidInputError, LlamaError
model = lb.Model(sys.argv[1])
ctx = lb.Context(model, n_ctx=512, n_batch=128, n_ubatch=32, n_seq_max=4, n_threads=1)
def refused(fn, exc=LlamaError, match=""):
    try:
        fn()
    except exc as e:
        assert match in str(e), (match, str(e))
        return e
    raise AssertionError("not refused")
def prompt_logits(seq=0, text="hello world"):
    b = lb.Batch(64); b.add(model.vocab.tokenize(text), 0, seq); ctx.decode(b)
def in_thread(fn):
    out = {}
    def run():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e
    t = threading.Thread(target=run); t.start()
    return t, out
"""


def run_threads(model_path: str, body: str) -> str:
    return run_isolated(model_path, body, PRELUDE, {**os.environ, "MALLOC_PERTURB_": "165"})


CASES = {
    # 1. sampling in one thread while another closes the context (was SIGSEGV, 4 runs of 4): close()
    #    must wait for the sample inside llama.cpp (here held there by a slow Python sampler), never
    #    free the context under it
    "close_waits_for_a_sample_in_another_thread": """
        prompt_logits()
        inside = threading.Event()
        class Slow(lb.PySampler):
            def apply(self, cur):
                inside.set(); time.sleep(0.5)
        s = lb.Sampler.chain(Slow().as_sampler(), lb.Sampler.dist(1))
        ends = {}
        def work():
            tok = s.sample(ctx)
            ends["sample"] = time.monotonic()
            return tok
        t, out = in_thread(work)
        inside.wait(10)
        ctx.close()
        ends["close"] = time.monotonic()
        t.join()
        assert isinstance(out.get("value"), int), out
        assert ends["close"] >= ends["sample"], ends  # freed only once the sample was out
        refused(lambda: s.sample(ctx), ClosedError)
        refused(lambda: lb.Sampler.dist(1).sample(ctx), ClosedError)
    """,
    # 3. a Python sampler that keeps cur.data past the sampling thread's end (read freed memory)
    "python_sampler_array_outlives_its_thread": """
        prompt_logits()
        kept = []
        class Keep(lb.PySampler):
            def apply(self, cur):
                kept.append(cur.data)
        s = lb.Sampler.chain(Keep().as_sampler(), lb.Sampler.greedy())
        t, out = in_thread(lambda: s.sample(ctx)); t.join()
        assert "value" in out, out
        gc.collect(); junk = [bytearray(1 << 16) for _ in range(64)]
        data = kept[0]
        assert data["id"].tolist() == list(range(model.vocab.n_tokens))
        assert np.array_equal(data["logit"], ctx.logits(-1))
    """,
    # 5. set_causal_attn between two steps of a generation (was SIGABRT at the next decode)
    "set_causal_attn_during_a_generation": """
        gen = lb.generate_many(ctx, ["hello there", "good morning"], max_tokens=8)
        next(gen)
        refused(lambda: ctx.set_causal_attn(False), BusyError, "driven by a generation")
        refused(lambda: ctx.memory.seq_rm(0), BusyError)
        refused(lambda: ctx.state_save(), BusyError)
        done = [ev for ev in gen if isinstance(ev, lb.DoneEvent)]
        assert len(done) == 2 and all(d.finish_reason in ("length", "stop") for d in done), done
        ctx.set_causal_attn(True)  # the generation is over: free again
    """,
    # 6. decode from inside the context's own abort callback (was SIGABRT)
    "decode_from_its_own_abort_callback": """
        b = lb.Batch(8); b.add(model.vocab.tokenize("hi"), 0, 0)
        ctx.set_abort_callback(lambda: ctx.decode(b))
        refused(lambda: ctx.decode(b), BusyError, "callback")
        ctx.set_abort_callback(lambda: ctx.close())
        refused(lambda: ctx.decode(b), BusyError, "callback")
        ctx.set_abort_callback(None)
        ctx.memory.clear(); ctx.decode(b)  # still usable
    """,
    # 7. seq_cp onto a sequence that holds cells: llama.cpp kept dst's old cells beside the copy
    "seq_cp_replaces_what_dst_held": """
        ctx.close(); ctx = lb.Context(model, n_ctx=512, n_batch=128, n_seq_max=2, kv_unified=True, n_threads=1)
        prompt_logits(1, "one two three four five six seven eight nine ten eleven")
        ctx.tokens.set(1, model.vocab.tokenize("one two three four five six seven eight nine ten eleven"))
        prompt_logits(0, "hello world")
        ctx.tokens.set(0, model.vocab.tokenize("hello world"))
        ctx.memory.seq_cp(0, 1)
        n = len(model.vocab.tokenize("hello world"))
        assert ctx.memory.seq_pos_max(1) == n - 1, ctx.memory.seq_pos_max(1)
        assert ctx.cached_tokens(1) == model.vocab.tokenize("hello world").tolist()
    """,
    # 8. an abort callback that raises, on an engine's context: the request ends as an error with its
    #    cause, and the engine goes on (it ended as "cancelled", and the engine closed for good)
    "engine_abort_callback_raises": """
        calls = []
        def boom():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("callback failed")
            return False
        ctx.set_abort_callback(boom)
        eng = lb.Engine(ctx)
        refused(lambda: ctx.set_abort_callback(None), BusyError, "driven by")  # the engine's context now
        with lb.EngineThread(eng) as et:
            done = et.complete(prompt="hello", max_tokens=4)
            assert done.finish_reason == "error" and isinstance(done.error, RuntimeError), done
            again = et.complete(prompt="hello", max_tokens=4)
            assert again.finish_reason in ("length", "stop") and again.error is None, again
    """,
    # 9. two drivers over one engine (3 of 8 requests answered, the others waited forever)
    "two_engine_threads_over_one_engine": """
        eng = lb.Engine(ctx)
        with lb.EngineThread(eng) as et:
            refused(lambda: lb.EngineThread(eng), BusyError, "driver")
            refused(lambda: lb.AsyncEngine(eng), BusyError, "driver")
            hs = [et.submit(prompt=f"request {i}", max_tokens=4) for i in range(8)]
            assert all(h.result().finish_reason in ("length", "stop") for h in hs)
    """,
    # 10. a submit that renders slowly must not hold the lock the dispatcher needs (an unrelated
    #     stream stalled for the whole tokenization of a million-word prompt)
    "slow_submit_does_not_hold_the_others": """
        release = threading.Event()
        class Slow(str):
            def encode(self, *a, **k):
                release.wait(30)
                return str(self).encode(*a, **k)
        with lb.EngineThread(lb.Engine(ctx)) as et:
            t, out = in_thread(lambda: et.submit(prompt=Slow("a slow prompt"), max_tokens=2).result())
            time.sleep(0.2)
            t0 = time.monotonic()
            done = et.complete(prompt="hello", max_tokens=4)
            assert done.finish_reason in ("length", "stop"), done
            assert not release.is_set() and time.monotonic() - t0 < 20
            release.set(); t.join()
            assert out["value"].finish_reason in ("length", "stop"), out
            huge = "word " * 2_000_000
            t0 = time.monotonic()
            refused(lambda: et.submit(prompt=huge), lb.ContextOverflowError, "cannot fit")
    """,
    # 11. a thread count that reaches a C allocation (std::bad_alloc through llama_decode: SIGABRT)
    "absurd_thread_counts": """
        refused(lambda: lb.Context(model, n_ctx=64, n_threads=100000), InvalidInputError, "thread counts")
        refused(lambda: lb.Context(model, n_ctx=64, n_threads_batch=-3), InvalidInputError, "thread counts")
        refused(lambda: ctx.set_threads(10**6), InvalidInputError, "thread counts")
        prompt_logits()
    """,
    # the same Sampler given to two engine requests (the second failed after one token)
    "one_sampler_for_two_requests": """
        with lb.EngineThread(lb.Engine(ctx)) as et:
            s = lb.Sampler.chain(lb.Sampler.top_k(5), lb.Sampler.dist(3))
            h = et.submit(prompt="hello", max_tokens=6, sampler=s)
            refused(lambda: et.submit(prompt="again", max_tokens=6, sampler=s), InvalidInputError, "belongs")
            assert h.result().finish_reason in ("length", "stop")
            refused(lambda: et.submit(prompt="again", max_tokens=6, sampler=s), InvalidInputError, "closed")
    """,
    # a refused submit leaves the caller's sampler to the caller
    "refused_submit_keeps_the_sampler": """
        eng = lb.Engine(ctx)
        s = lb.Sampler.greedy()
        refused(lambda: eng.submit(prompt=list(range(1, 300)) * 4, sampler=s), lb.ContextOverflowError)
        assert not s.closed
        eng.submit(prompt="hello", max_tokens=2, sampler=s)
        eng.run()
        mine = lb.Sampler.chain(lb.Sampler.top_k(3), lb.Sampler.dist(1))
        state = eng.prepare(prompt="hello", max_tokens=2, sampler=mine)  # accepted, then the engine closes
        eng.close()
        refused(lambda: eng.enqueue(state), ClosedError)
        assert not mine.closed and mine.sample is not None
        mine.take("someone else")  # the caller's again, free to give to another engine
    """,
    # close() with a Python abort callback installed aborts the running decode (it waited for all of it)
    "close_aborts_under_a_python_abort_callback": """
        started = threading.Event()
        def slow():
            started.set(); time.sleep(0.05)
            return False
        ctx.set_abort_callback(slow)
        b = lb.Batch(128); b.add(model.vocab.tokenize("word " * 20), 0, 0)
        t, out = in_thread(lambda: ctx.decode(b))
        started.wait(10)
        t0 = time.monotonic()
        ctx.close()
        took = time.monotonic() - t0
        t.join()
        assert isinstance(out.get("error"), (lb.AbortedError, ClosedError)), out
        assert took < 2.0, took  # one callback's sleep, not one per graph node
    """,
}


# Cases that need a decode in flight for a while: gemma3-270m takes seconds over a long prompt.
SLOW_CASES = {
    # 2. model and vocab getters racing Model.close (was SIGSEGV)
    "model_getters_while_another_thread_closes": """
        ctx.close()
        for attempt in range(8):
            m = lb.Model(sys.argv[1]) if attempt else model
            v = m.vocab
            def work():
                while True:
                    m.metadata; m.n_head; m.description; v.is_eog(1); v.add_bos; v.eos
                    v.tokenize("a few words"); m.chat_template()
            t, out = in_thread(work)
            time.sleep(0.05 + 0.013 * attempt)
            m.close()
            t.join()
            assert isinstance(out["error"], ClosedError), out
            refused(lambda: m.metadata, ClosedError)
            refused(lambda: v.is_eog(1), ClosedError)
    """,
    # every array the API hands out stays the caller's: past the next decode, close and thread exit
    "arrays_outlive_their_source": """
        kept = {}
        def make():
            prompt_logits(0, "the first prompt")
            kept["logits"] = ctx.logits(-1)
            kept["tokens"] = model.vocab.tokenize("some words here")
            kept["cached"] = ctx.cached_tokens(0)
            ectx = lb.Context(model, n_ctx=64, n_batch=64, n_threads=1, embeddings=True, pooling="mean")
            b = lb.Batch(16); b.add(model.vocab.tokenize("embed me"), 0, 0, logits="all"); ectx.decode(b)
            kept["embd"] = ectx.embeddings(-1)
            kept["embd_seq"] = ectx.embeddings_seq(0)
            ectx.close()
        t, out = in_thread(make); t.join()
        assert "error" not in out, out
        snapshot = {k: np.array(v, copy=True) for k, v in kept.items()}
        prompt_logits(1, "a different prompt entirely")  # the next decode reuses llama.cpp's buffers
        ctx.close(); model.close(); gc.collect()
        junk = [np.full(1 << 14, 7.0) for _ in range(64)]
        for k, v in kept.items():
            assert np.array_equal(np.asarray(v), snapshot[k]), k
    """,
    # 4. the interpreter exits while an EngineThread decodes (was SIGSEGV in the finalizers)
    "interpreter_exit_while_engine_decodes": """
        ctx.close()
        eng = lb.EngineThread(lb.Engine.load(model, n_slots=2, n_ctx=4096, n_batch=2048, n_threads=2))
        for i in range(2):
            eng.submit(prompt="word " * 500 + str(i), max_tokens=300, ignore_eog=True)
        time.sleep(0.5)
        print("OK", flush=True)
        sys.exit(0)  # with the driver thread inside llama_decode
    """,
    # close() from another thread while a Cancel is installed aborts too (it pointed the flag elsewhere)
    "close_aborts_a_generation_with_a_cancel": """
        ctx.close(); ctx = lb.Context(model, n_ctx=2048, n_batch=2048, n_threads=2)  # one decode for the prompt
        cancel = lb.Cancel()
        events = []
        def gen():
            for ev in lb.generate(ctx, "word " * 900, max_tokens=400, cancel=cancel, ignore_eog=True):
                events.append(ev)
        t, out = in_thread(gen)
        time.sleep(0.3)  # inside the prompt's decode (seconds on this model)
        t0 = time.monotonic()
        ctx.close()
        took = time.monotonic() - t0
        t.join(30)
        assert took < 1.0, took  # aborted, not waited for
        assert not t.is_alive()
        assert not cancel.is_set()
        assert isinstance(out.get("error"), (ClosedError, lb.AbortedError)) or \
            events[-1].finish_reason in ("cancelled", "error"), (out, events[-1:])
    """,
    # the engine's context closed under it: every request ends as an error naming it, later calls too
    "engine_context_closed_under_it": """
        ctx.close(); ctx = lb.Context(model, n_ctx=2048, n_batch=2048, n_threads=2)
        eng = lb.Engine(ctx)
        with lb.EngineThread(eng) as et:
            h = et.submit(prompt="hello " * 900, max_tokens=400, ignore_eog=True)
            time.sleep(0.3)  # inside the prompt's decode
            ctx.close()
            done = h.result()
            assert done.finish_reason in ("error", "cancelled"), done
            refused(lambda: et.submit(prompt="again", max_tokens=2), ClosedError)
    """,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_threads(tiny_model_path, name):
    run_threads(tiny_model_path, CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_threads_mid_decode(gemma_path, name):
    run_threads(gemma_path, SLOW_CASES[name])
