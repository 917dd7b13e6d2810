"""Draft-model speculation in the engine: a second context on a model with a compatible
vocabulary drafts for the requests that ask, and the engine verifies the drafts in its own batch.
The proof is greedy output: the same tokens as without speculation (but at near-ties of batched
kernels, checked by a one-sequence recomputation) and every token the recomputation's arg-max."""

from __future__ import annotations

import numpy as np
import pytest

import llamabind as lb
from llamabind.engine import Engine
from llamabind.engine.draft import incompatibility
from test_engine import _by_id, _greedy_within, _same_or_near_tie
from tinymodels import write_tiny_llama

TINY_TIE = 5e-3  # the tiny model's logits spread ~0.15; batch shapes move them by well under this


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """A tiny model with the same vocabulary and other weights: it drafts, and is mostly wrong."""
    with lb.Model(write_tiny_llama(tmp_path_factory.mktemp("draft") / "tiny-seed1.gguf", seed=1)) as m:
        yield m


def _run(model: lb.Model, draft: lb.Model | None, prompts: list[str], n_ctx: int) -> tuple[list, lb.Engine]:
    """Requests join a running batch: every other one speculates (the draft model, or n-grams
    for the third), one samples at a temperature; the rest decode plainly."""
    with Engine.load(model, n_slots=4, n_ctx=n_ctx, n_threads=2, draft_model=draft) as eng:
        ids, events = [], []
        for i, p in enumerate(prompts):
            spec = {} if draft is None or i % 2 == 0 else {"n_draft": 2 + i % 5, "draft": "ngram" if i == 3 else "auto"}
            ids.append(eng.submit(prompt=p, max_tokens=40 + 8 * i, ignore_eog=True, **spec))
            events += eng.step() + eng.step()
        sampled = eng.submit(prompt=prompts[0], max_tokens=30, ignore_eog=True, temperature=0.8, seed=3,
                             **({"n_draft": 4} if draft is not None else {}))
        events += eng.run()
        done, toks = _by_id(events)
        assert all(done[i].finish_reason == "length" and done[i].tokens == toks[i] for i in ids)
        assert len(done[sampled].tokens) == 30
        return [done[i] for i in ids], eng


@pytest.mark.parametrize("n_ctx", [4096, 256])
def test_draft_model_keeps_greedy_output(tiny_model, other_tiny, n_ctx):
    """The tiny model drafting for itself (its drafts all but always accepted) and a tiny model
    with other weights (drafts rejected): prompts sharing a prefix, requests joining a running
    batch, and with 256 cells pre-emptions. Outputs equal the run without speculation."""
    system = "hello world the world " * 8
    prompts = [system + "hello", system + "the world is", "hello", system + "a b c", "x y z " * 10, system]
    plain, _ = _run(tiny_model, None, prompts, n_ctx)
    v = tiny_model.vocab
    for draft in (tiny_model, other_tiny):
        spec, eng = _run(tiny_model, draft, prompts, n_ctx)
        assert eng.metrics().draft_s > 0
        if n_ctx == 256:
            assert eng.metrics().preempted > 0
        for i, (p, a, b) in enumerate(zip(prompts, plain, spec)):
            prompt = v.tokenize(p)
            _same_or_near_tie(tiny_model, prompt, a.tokens, b.tokens, TINY_TIE)
            _greedy_within(tiny_model, prompt, b.tokens, TINY_TIE)
            m = b.metrics
            if i % 2 == 0:
                assert m.drafted_tokens == 0
            elif i != 3:
                assert m.drafted_tokens > 10
                if draft is tiny_model:
                    assert m.accepted_tokens >= 0.9 * m.drafted_tokens, (m.accepted_tokens, m.drafted_tokens)


def test_gemma_drafts_for_itself(gemma_model):
    """gemma3-270m drafting for itself on a copying task: nearly every draft is accepted and the
    output is the greedy one."""
    code = "def area(width, height):\n    return width * height\n\n" * 2
    prompt = f"Copy this code exactly.\n{code}\nCopy:\n"
    v = gemma_model.vocab
    outs = {}
    for draft in (None, gemma_model):
        with Engine.load(gemma_model, n_slots=2, n_ctx=1024, n_threads=2, draft_model=draft) as eng:
            rid = eng.submit(prompt=prompt, max_tokens=32, n_draft=6 if draft else 0)
            other = eng.submit(prompt="The capital of France is", max_tokens=8)
            done, toks = _by_id(eng.run())
            outs[draft is not None] = done[rid]
            assert done[other].finish_reason in ("length", "stop") and done[rid].tokens == toks[rid]
    m = outs[True].metrics
    assert m.drafted_tokens >= 16 and m.accepted_tokens >= 0.8 * m.drafted_tokens, (m.accepted_tokens, m.drafted_tokens)
    _same_or_near_tie(gemma_model, v.tokenize(prompt), outs[False].tokens, outs[True].tokens)
    _greedy_within(gemma_model, v.tokenize(prompt), outs[True].tokens)


def test_incompatible_draft_models_are_refused(tiny_model, gemma_model):
    """A draft model whose vocabulary differs is refused when the engine is made, with the reason;
    draft='model' without a draft model, or an unknown draft kind, at submit."""
    assert incompatibility(tiny_model, tiny_model) is None
    assert "differ" in (incompatibility(tiny_model, gemma_model) or "")  # the bos ids, here
    with pytest.raises(lb.InvalidInputError, match="cannot draft"):
        Engine.load(tiny_model, n_slots=2, n_ctx=256, n_threads=2, draft_model=gemma_model)
    with pytest.raises(lb.InvalidInputError):
        Engine.load(tiny_model, n_slots=2, n_ctx=256, n_threads=2, draft_model="tiny.gguf")
    with Engine.load(tiny_model, n_slots=2, n_ctx=256, n_threads=2) as eng:
        for bad in ("model", "eagle"):
            with pytest.raises(lb.InvalidInputError, match="draft"):
                eng.submit(prompt="hello", n_draft=4, draft=bad)
        eng.submit(prompt="hello", n_draft=4, draft="ngram", max_tokens=4)
        assert len(_by_id(eng.run())[0]) == 1
