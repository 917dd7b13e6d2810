"""The engine: requests that join and leave a running batch, shared prefixes, pre-emption,
context shift, logprobs, n-gram drafts, errors that stay with their request, and the thread and
asyncio facades. Greedy tokens are checked against a single-sequence recomputation (llama.cpp's
CPU kernels differ by batch shape, so only near-ties may break differently), or exactly where the
engine's batches are the reference's."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import llamabind as lb
from llamabind.engine import Engine

TEXT = ("The river runs past the old stone mill, where the miller keeps his tools and his books. "
        "Every winter the harbor freezes and the boats wait for spring. ")


def _greedy_within(model: lb.Model, prompt: np.ndarray, out: list[int], tol: float = 0.5) -> None:
    """Every token of ``out`` is the arg-max, up to ``tol``, of a one-sequence recomputation
    (batch shapes move gemma3-270m's logits by up to about 1; a wrong cache moves them by many)."""
    seq = np.concatenate([prompt, np.asarray(out[:-1], np.int32)])
    with lb.Context(model, n_ctx=max(512, seq.size + 8), n_batch=seq.size + 8, n_threads=2) as ref:
        b = lb.Batch(seq.size)
        b.add(seq, 0, 0, logits="all")
        ref.decode(b)
        for k, tok in enumerate(out):
            row = ref.logits(prompt.size - 1 + k)
            assert row[tok] >= row.max() - tol, (k, tok, int(row.argmax()), float(row.max() - row[tok]))


def _same_or_near_tie(model: lb.Model, prompt: np.ndarray, a: list[int], b: list[int], tol: float = 1.1) -> None:
    """``a`` and ``b`` are equal, or first differ where a recomputation finds both choices
    within batch-shape noise of each other."""
    if a == b:
        return
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert k < min(len(a), len(b)), "one output is a prefix of the other"
    seq = np.concatenate([prompt, np.asarray(a[:k], np.int32)])
    with lb.Context(model, n_ctx=max(512, seq.size + 8), n_batch=seq.size + 8, n_threads=2) as ref:
        b_ = lb.Batch(seq.size)
        b_.add(seq, 0, 0, logits="last")
        ref.decode(b_)
        row = ref.logits(-1)
    assert abs(float(row[a[k]] - row[b[k]])) < tol and min(row[a[k]], row[b[k]]) >= row.max() - tol, k


def _by_id(events: list) -> tuple[dict[int, lb.DoneEvent], dict[int, list[int]]]:
    done, toks = {}, {}
    for ev in events:
        if isinstance(ev, lb.DoneEvent):
            assert ev.index not in done, "one DoneEvent per request"
            done[ev.index] = ev
        elif ev.token is not None:
            toks.setdefault(ev.index, []).append(ev.token)
    return done, toks


def test_one_request_equals_generate_exactly(tiny_model):
    """With the batch to itself a request is decoded in generate()'s chunks: the same tokens, bit for bit."""
    with lb.Context(tiny_model, n_ctx=512, n_batch=64, n_threads=2) as ctx:
        prompt = ctx.vocab.tokenize("hello world " * 30)
        want = lb.complete(ctx, prompt, max_tokens=40, ignore_eog=True, reuse_cache=False).tokens
        ctx.memory.clear()
        eng = Engine(ctx, prefill_budget=64)
        rid = eng.submit(prompt=prompt, max_tokens=40, ignore_eog=True)
        events = eng.run()
        done, toks = _by_id(events)
        assert done[rid].tokens == toks[rid] == want
        times = [e.time for e in events if isinstance(e, lb.TokenEvent)]  # sampling times, the flush's too
        assert times and times[0] > 0 and times == sorted(times)
        assert done[rid].finish_reason == "length" and done[rid].usage.prompt_tokens == prompt.size
        m = done[rid].metrics
        assert m.ttft_s > 0 and m.decode_tps > 0 and m.itl_p95_s >= m.itl_p50_s > 0


def test_requests_join_and_leave_a_running_batch(gemma_model):
    """Requests arrive while others generate, with their own lengths and stops; every token stays
    its own sequence's greedy choice, and each request ends once, with its own reason."""
    with Engine.load(gemma_model, n_slots=4, n_ctx=2048, n_threads=2) as eng:
        v = gemma_model.vocab
        prompts = ["The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3, 4,"]
        ids, events = [eng.submit(prompt=prompts[0], max_tokens=12)], []
        for i, p in enumerate(prompts[1:], 1):
            for _ in range(3):
                events += eng.step()
            ids.append(eng.submit(prompt=p, max_tokens=6 + 3 * i, stop=["\n\n\n"]))
        events += eng.run()
        done, toks = _by_id(events)
        assert sorted(done) == sorted(ids)
        for rid, p in zip(ids, prompts):
            d = done[rid]
            assert d.tokens == toks[rid] and d.finish_reason in ("length", "stop")
            assert d.text == "".join(ev.text for ev in events if isinstance(ev, lb.TokenEvent) and ev.index == rid)
            _greedy_within(gemma_model, v.tokenize(p), d.tokens)
        assert eng.metrics().mean_batch > 1.5  # they really shared batches
        assert not eng.has_work


def test_shared_system_prompt_is_decoded_once(gemma_model):
    """Eight requests on one long system prompt: it is decoded once and copied (seq_cp) into the
    other sequences; usage.cached_tokens says so, and the outputs are still greedy."""
    v = gemma_model.vocab
    system = TEXT * 6
    n_sys = v.tokenize(system).size
    with Engine.load(gemma_model, n_slots=8, n_ctx=4096, n_threads=2) as eng:
        asks = [f"{system}Question {i}: what freezes in winter?" for i in range(8)]
        ids = [eng.submit(prompt=a, max_tokens=4) for a in asks]
        done, _ = _by_id(eng.run())
        cached = sorted(done[i].usage.cached_tokens for i in ids)
        assert cached[0] == 0 and all(c >= n_sys - 2 for c in cached[1:]), cached
        prompt_tokens = sum(done[i].usage.prompt_tokens for i in ids)
        decoded = eng.metrics().tokens_decoded
        assert decoded < prompt_tokens - 6 * n_sys, (decoded, prompt_tokens, n_sys)
        for i in ids[:3]:
            _greedy_within(gemma_model, v.tokenize(asks[i - ids[0]]), done[i].tokens)


@pytest.mark.parametrize("swa_full", [True, False])
def test_prefix_reuse_on_a_sliding_window_cache(gemma_model, swa_full):
    """gemma3-270m's window is 512: a second request that shares 900 tokens with a finished one
    reuses them only where the window behind them is still in the cache; either way its tokens are
    the greedy ones (the hardening issue's SWA case, through the engine)."""
    v = gemma_model.vocab
    base = v.tokenize(TEXT * 30)[:900]
    assert base.size == 900
    with Engine.load(gemma_model, n_slots=2, n_ctx=2048, n_threads=2, swa_full=swa_full) as eng:
        first = eng.submit(prompt=base, max_tokens=3)
        eng.run()
        branch = np.concatenate([base, v.tokenize(" And then", add_special=False)])
        rid = eng.submit(prompt=branch, max_tokens=8)
        done, _ = _by_id(eng.run())
        assert first != rid
        if swa_full:
            assert done[rid].usage.cached_tokens == 900
        _greedy_within(gemma_model, branch, done[rid].tokens)


def test_kv_cache_full_preempts_instead_of_failing(gemma_model):
    """Four requests that together need more cells than the cache has: the newest is pre-empted
    and re-queued (its output kept), every request finishes with all its tokens, and the outputs
    are those of a run with room to spare."""
    v = gemma_model.vocab
    prompts = [f"Story {i}: " + TEXT for i in range(4)]
    runs = {}
    for n_ctx in (256, 2048):
        with Engine.load(gemma_model, n_slots=4, n_ctx=n_ctx, n_batch=256, n_threads=2, swa_full=True) as eng:
            ids = [eng.submit(prompt=p, max_tokens=48, ignore_eog=True) for p in prompts]
            done, toks = _by_id(eng.run())
            assert all(done[i].finish_reason == "length" and done[i].tokens == toks[i] for i in ids)
            assert all(len(done[i].tokens) == 48 for i in ids)
            runs[n_ctx] = ([done[i].tokens for i in ids], eng.metrics().preempted,
                           [done[i].metrics.preempted for i in ids])
    (tight, n_pre, per), (roomy, n_none, _) = runs[256], runs[2048]
    assert n_pre > 0 and n_none == 0 and sum(per) == n_pre
    assert n_pre <= 4, f"pre-empted {n_pre} times: a victim must wait for room, not thrash"
    for p, a, b in zip(prompts, tight, roomy):
        _same_or_near_tie(gemma_model, v.tokenize(p), b, a)


def test_context_shift_or_length(tiny_model):
    with Engine.load(tiny_model, n_slots=1, n_ctx=256, n_threads=2) as eng:
        a = eng.submit(prompt="hello world", max_tokens=300, ignore_eog=True)
        b = eng.submit(prompt="hello world", max_tokens=600, ignore_eog=True, context_shift=True, n_keep=4)
        done, _ = _by_id(eng.run())
        n_prompt = done[a].usage.prompt_tokens
        # the last position holds the token sampled from it: n_ctx_seq decoded, one more generated
        assert done[a].finish_reason == "length" and n_prompt + len(done[a].tokens) == eng.ctx.n_ctx_seq + 1
        assert done[b].finish_reason == "length" and len(done[b].tokens) == 600


def test_logprobs_match_the_logits(tiny_model):
    with Engine.load(tiny_model, n_slots=2, n_ctx=512, n_threads=2) as eng:
        rid = eng.submit(prompt="hello world", max_tokens=5, top_logprobs=3, ignore_eog=True)
        other = eng.submit(prompt="the world", max_tokens=5, ignore_eog=True)
        evs = [e for e in eng.run() if isinstance(e, lb.TokenEvent) and e.token is not None]
        mine = [e for e in evs if e.index == rid]
        assert all(e.logprob is None for e in evs if e.index == other)
        prompt = tiny_model.vocab.tokenize("hello world")
        with lb.Context(tiny_model, n_ctx=64, n_threads=2) as ref:
            seq = np.concatenate([prompt, np.asarray([e.token for e in mine[:-1]], np.int32)])
            b = lb.Batch(seq.size)
            b.add(seq, 0, 0, logits="all")
            ref.decode(b)
            for k, e in enumerate(mine):
                row = ref.logits(prompt.size - 1 + k).astype(np.float64)
                lsm = row - row.max() - np.log(np.exp(row - row.max()).sum())
                assert e.logprob.token == e.token and abs(e.logprob.logprob - lsm[e.token]) < 1e-3
                assert [t for t, _ in e.logprob.top] == list(np.argsort(-lsm, kind="stable")[:3])
                assert e.logprob.top[0][0] == e.token  # greedy: the best one


def test_ngram_drafts_keep_greedy_output(gemma_model):
    """Prompt-lookup drafts on a copying task: most drafts are accepted and the output is the
    greedy one (identical to the run without drafts but at near-ties of batched kernels)."""
    code = "def area(width, height):\n    return width * height\n\n" * 3
    prompt = f"Copy this code exactly.\n{code}\nCopy:\n{code[:40]}"
    with Engine.load(gemma_model, n_slots=1, n_ctx=1024, n_threads=2) as eng:
        plain = eng.submit(prompt=prompt, max_tokens=40)
        d0, _ = _by_id(eng.run())
        spec = eng.submit(prompt=prompt, max_tokens=40, n_draft=8)
        d1, toks = _by_id(eng.run())
    a, b = d0[plain].tokens, d1[spec].tokens
    assert toks[spec] == b and d1[spec].metrics.accepted_tokens > 10
    _same_or_near_tie(gemma_model, gemma_model.vocab.tokenize(prompt), a, b)


def test_bad_requests_are_refused_at_submit(tiny_model):
    with Engine.load(tiny_model, n_slots=2, n_ctx=128, n_threads=2, max_queue=3) as eng:
        bad = [dict(prompt="x", max_tokens=0), dict(prompt="x", nonsense=1), dict(),
               dict(prompt="x", messages=[{"role": "user", "content": "hi"}]),
               dict(prompt="x", sampler=lb.Sampler.greedy(), temperature=0.5), dict(prompt="x", n_draft=99),
               dict(prompt="x", top_logprobs=50), dict(prompt="x", deadline_s=-1), dict(prompt=[10 ** 7]),
               dict(prompt="x", tools=[]), dict(prompt="x", sampler="greedy")]
        for kw in bad:
            with pytest.raises(lb.InvalidInputError):
                eng.submit(**kw)
        with pytest.raises(lb.ContextOverflowError):
            eng.submit(prompt=[5] * eng.ctx.n_ctx_seq)
        for _ in range(3):
            eng.submit(prompt="hello", max_tokens=2)
        with pytest.raises(lb.BusyError):
            eng.submit(prompt="hello", max_tokens=2)
        done, _ = _by_id(eng.run())
        assert len(done) == 3  # nothing refused ever queued
    with pytest.raises(lb.ClosedError):
        eng.submit(prompt="hello")


def test_a_failing_sampler_ends_only_its_request(tiny_model):
    class Boom(lb.PySampler):
        def __init__(self):
            super().__init__()
            self.n = 0

        def apply(self, cur):
            self.n += 1
            if self.n == 3:
                raise KeyError("boom")
            cur.selected = int(np.argmax(cur.data["logit"]))

    with Engine.load(tiny_model, n_slots=3, n_ctx=512, n_threads=2) as eng:
        bad = eng.submit(prompt="hello", max_tokens=10, sampler=Boom().as_sampler(), ignore_eog=True)
        good = [eng.submit(prompt=p, max_tokens=10, ignore_eog=True) for p in ("hello world", "the")]
        done, _ = _by_id(eng.run())
        assert done[bad].finish_reason == "error" and isinstance(done[bad].error, KeyError)
        assert len(done[bad].tokens) == 2
        assert all(done[g].finish_reason == "length" and len(done[g].tokens) == 10 for g in good)
        again = eng.submit(prompt="hello", max_tokens=3, ignore_eog=True)
        assert _by_id(eng.run())[0][again].finish_reason == "length"


def test_cancel_deadline_and_close(tiny_model):
    eng = Engine.load(tiny_model, n_slots=2, n_ctx=512, n_threads=2)
    a = eng.submit(prompt="hello", max_tokens=400, ignore_eog=True)
    c = eng.submit(prompt="hello world", max_tokens=400, ignore_eog=True, deadline_s=0.3)
    b = eng.submit(prompt="world", max_tokens=5, ignore_eog=True)  # waits for a slot
    queued = eng.submit(prompt="the", max_tokens=5, ignore_eog=True)  # waits too
    events = eng.step() + eng.step()  # a and c run
    eng.cancel(a)
    eng.cancel(queued)
    eng.cancel(12345)  # unknown: ignored
    time.sleep(0.3)  # c's deadline has passed, however fast or slow the steps were
    while eng.has_work and not {a, b, queued, c} <= {e.index for e in events if isinstance(e, lb.DoneEvent)}:
        events += eng.step()
    done, _ = _by_id(events)
    assert done[a].finish_reason == "cancelled" and 0 < len(done[a].tokens) < 400
    assert done[queued].finish_reason == "cancelled" and done[queued].tokens == []
    assert done[b].finish_reason == "length" and done[c].finish_reason == "deadline"
    d = eng.submit(prompt="hello", max_tokens=400, ignore_eog=True)
    eng.step()
    closing = eng.close()
    assert [e.finish_reason for e in closing if isinstance(e, lb.DoneEvent) and e.index == d] == ["cancelled"]
    with pytest.raises(lb.ClosedError):
        eng.step()


def test_engine_thread_from_many_threads(tiny_model):
    """Requests submitted from several threads at once; a consumer that leaves cancels its request."""
    with lb.EngineThread(Engine.load(tiny_model, n_slots=4, n_ctx=1024, n_threads=2)) as et:
        results: dict[int, lb.DoneEvent] = {}

        def worker(i: int) -> None:
            results[i] = et.complete(prompt=f"hello {i}", max_tokens=8 + i, ignore_eog=True)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(6))
        assert all(results[i].finish_reason == "length" and len(results[i].tokens) == 8 + i for i in range(6))
        stream = et.generate(prompt="hello", max_tokens=500, ignore_eog=True)
        next(stream)
        stream.close()  # the consumer goes away
        assert et.complete(prompt="world", max_tokens=3, ignore_eog=True).finish_reason == "length"
        assert et.engine.metrics().active == 0


def test_async_engine_streams_and_cancels(tiny_model):
    async def main() -> None:
        eng = lb.AsyncEngine(Engine.load(tiny_model, n_slots=4, n_ctx=1024, n_threads=2))
        try:
            async def collect(i: int) -> lb.DoneEvent:
                n = 0
                async for ev in eng.stream(prompt=f"world {i}", max_tokens=6, ignore_eog=True):
                    if isinstance(ev, lb.DoneEvent):
                        assert n == len(ev.tokens) == 6
                        return ev
                    n += ev.token is not None
                raise AssertionError("no DoneEvent")

            dones = await asyncio.gather(*(collect(i) for i in range(4)))
            assert {d.index for d in dones} == set(range(1, 5))

            async def forever() -> None:
                async for _ in eng.stream(prompt="hello", max_tokens=10 ** 4, ignore_eog=True, n_keep=0):
                    pass

            task = asyncio.create_task(forever())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            last = await eng.complete(prompt="hello", max_tokens=2, ignore_eog=True)
            assert last.finish_reason == "length"
            for _ in range(50):
                if eng.engine.metrics().active == 0:
                    break
                await asyncio.sleep(0.05)
            assert eng.engine.metrics().active == 0
        finally:
            await eng.aclose()

    asyncio.run(main())


def test_chat_request_with_json_schema(gemma_model):
    """A chat request through the engine: the schema's grammar constrains the output."""
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"]}
    with Engine.load(gemma_model, n_slots=2, n_ctx=1024, n_threads=2) as eng:
        rid = eng.submit(messages=[{"role": "user", "content": "Name a big city and its population as JSON."}],
                         response_format={"type": "json_schema", "json_schema": {"schema": schema}}, max_tokens=60)
        other = eng.submit(prompt="The capital of France is", max_tokens=8)
        done, _ = _by_id(eng.run())
        data = json.loads(done[rid].text)
        assert isinstance(data["city"], str) and isinstance(data["population"], int)
        assert done[other].finish_reason in ("length", "stop")
