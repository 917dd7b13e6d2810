"""Reading the model's next-token distribution instead of sampling from it: one decode of the
prompt (reusing its cached prefix), then the logits of the token after it. Classifying a text
into labels, or a yes/no reranker, is a softmax over a few token ids of that one row."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..batch import Batch
from ..context import Context
from ..errors import InvalidInputError
from .api import Messages, Prompt, _check_ctx, _check_fit, render_prompt
from .loop import keep_prefix


def next_logits(ctx: Context, prompt: Prompt | None = None, *, messages: Messages | None = None,
                seq_id: int = 0, reuse_cache: bool = True, template: str | None = None, add_special: bool = True,
                parse_special: bool = True, **chat: Any) -> np.ndarray:
    """The logits (float32, n_vocab) of the token after ``prompt`` or the rendered ``messages``
    (``chat``: generate()'s chat options, e.g. ``enable_thinking=False``); nothing is sampled.
    The prompt stays in the sequence's KV cache, so the next call with the same head decodes
    only the rest."""
    _check_ctx(ctx, 1)
    ctx.check_seq(seq_id)
    tokens = render_prompt(ctx, prompt, messages, template, add_special, parse_special, chat=chat)
    _check_fit(ctx, tokens)
    with ctx.lease() as lease:
        with ctx.hold(lease):
            pos = keep_prefix(ctx, seq_id, tokens, reuse_cache)
        batch = Batch(min(ctx.n_batch, int(tokens.size - pos)), 1)
        while pos < tokens.size:
            part = tokens[pos:pos + batch.capacity]
            batch.clear()
            batch.add(part, pos, seq_id, logits="last" if pos + part.size == tokens.size else False)
            with ctx.hold(lease):
                try:
                    ctx.run(batch)
                except BaseException:
                    ctx.memory.seq_rm(seq_id, pos, -1)
                    ctx.tokens.set(seq_id, tokens[:pos])
                    raise
                ctx.tokens.extend(seq_id, part)
            pos += part.size
        with ctx.hold(lease):
            return ctx.logits(-1)


def choice_tokens(ctx: Context, choices: Sequence[str | int]) -> np.ndarray:
    """The first token of each choice (a string as it would be generated, or a token id); they must differ."""
    vocab = ctx.vocab
    ids = []
    for c in choices:
        if isinstance(c, str):
            toks = vocab.tokenize(c, add_special=False, parse_special=True)
            if toks.size == 0:
                raise InvalidInputError(f"choice {c!r} gives no tokens")
            ids.append(int(toks[0]))
        else:
            ids.append(vocab.check_token(c))
    if len(ids) < 2:
        raise InvalidInputError("give at least two choices")
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"choices {list(choices)!r} do not all start with different tokens {ids}: "
                                "one decode cannot tell them apart")
    return np.asarray(ids, dtype=np.int64)


def choice_probs(ctx: Context, prompt: Prompt | None = None, *, choices: Sequence[str | int],
                 messages: Messages | None = None, **kw: Any) -> np.ndarray:
    """Probabilities (float64, summing to 1) of each choice's first token coming next: a softmax
    over those tokens' logits alone (labels for a classifier, ``["yes", "no"]`` for a reranker)."""
    ids = choice_tokens(ctx, choices)
    row = next_logits(ctx, prompt, messages=messages, **kw)[ids].astype(np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


def classify(ctx: Context, prompt: Prompt | None = None, *, labels: Sequence[str],
             messages: Messages | None = None, **kw: Any) -> tuple[str, Mapping[str, float]]:
    """The most likely of ``labels`` and every label's probability (see ``choice_probs``)."""
    p = choice_probs(ctx, prompt, choices=labels, messages=messages, **kw)
    return labels[int(np.argmax(p))], dict(zip(labels, map(float, p)))
