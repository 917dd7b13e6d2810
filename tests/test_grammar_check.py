"""A chain that starts with a grammar samples as llama-server does (``common_sampler_sample``):
the rest of the chain picks a token, the grammar checks that one token, and only a rejected token
costs the grammar a pass over every candidate. The tokens are the same as with the grammar applied
to every candidate first (greedy), and the output keeps to the grammar where the model strays."""

from __future__ import annotations

import re

import llamabind as lb

GRAMMAR = 'root ::= "(" [a-z]+ ")" [0-9]+'
PREFIX = re.compile(r"\([a-z]*(\)[0-9]*)?")  # what the grammar allows after any number of tokens


def _run(ctx: lb.Context, sampler: lb.Sampler, n: int) -> list[int]:
    ctx.memory.clear()
    b = lb.Batch(64)
    b.add(ctx.vocab.tokenize("Write something:"), 0, 0)
    ctx.decode(b)
    out = []
    for pos in range(b.n_tokens, b.n_tokens + n):
        tok = sampler.sample(ctx)
        out.append(tok)
        b.clear()
        b.add([tok], pos, 0)
        ctx.decode(b)
    return out


def test_checked_grammar_picks_what_the_full_pass_picks(tiny_model):
    with lb.Context(tiny_model, n_ctx=256, n_threads=1) as ctx:
        checked = lb.Sampler.chain(lb.Sampler.grammar(ctx.vocab, GRAMMAR), lb.Sampler.greedy())
        full = lb.Sampler.chain(lb.Sampler.temp(1.0), lb.Sampler.grammar(ctx.vocab, GRAMMAR), lb.Sampler.greedy())
        assert checked._checked and not full._checked
        a, b = _run(ctx, checked, 12), _run(ctx, full, 12)
        assert a == b
        assert PREFIX.fullmatch(ctx.vocab.detokenize(a)), ctx.vocab.detokenize(a)


def test_checked_grammar_with_dist_keeps_to_the_grammar(tiny_model):
    with lb.Context(tiny_model, n_ctx=256, n_threads=1) as ctx:
        for seed in range(4):
            s = lb.Sampler.from_params(ctx.vocab, grammar=GRAMMAR, temperature=1.5, top_k=0, top_p=1.0,
                                       min_p=0.0, seed=seed)
            assert s._checked
            text = ctx.vocab.detokenize(_run(ctx, s, 10))
            assert PREFIX.fullmatch(text), text
