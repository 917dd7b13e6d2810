"""Log-probabilities of a chosen token and its best alternatives, from one row of raw logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """The chosen ``token``'s log-probability under the model (raw logits, before sampling),
    and the ``top`` N (token, logprob) pairs, best first, as OpenAI's ``logprobs`` reports them."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_of(row: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """log-softmax of ``row`` at ``token``, plus the ``top_n`` best tokens (float32 row, any length)."""
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m, dtype=np.float32).sum(dtype=np.float64)))
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        idx = np.argpartition(row, -top_n)[-top_n:]
        idx = idx[np.argsort(-row[idx], kind="stable")]
        top = tuple((int(i), float(row[i]) - lse) for i in idx)
    return TokenLogprob(int(token), float(row[token]) - lse, top)
