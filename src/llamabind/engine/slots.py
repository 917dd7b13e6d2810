"""Where a request runs: the slot (sequence id) whose cache, or another slot's, holds the longest
prefix of its prompt; KV room when the cache fills; shifting a sequence that reached the end."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..context import Context
from ..generation.loop import _reusable
from .request import RequestState


def common_prefix(a: np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the common prefix of the token arrays ``a`` and ``b``."""
    n = min(a.size, len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


def donor_tokens(s: RequestState) -> Sequence[int] | np.ndarray:
    """What a running request's sequence has or soon will have: its prompt while it prefills
    (a waiting request copies once the donor gets there), its cached tokens afterwards."""
    if s.shifted:
        return ()
    return s.tokens if s.prefilling else s.hist


def place(ctx: Context, s: RequestState, slots: list[RequestState | None], free: list[int],
          last_used: list[float], share: bool) -> tuple[int, int, int, int]:
    """Choose ``s``'s slot among ``free``: (slot, tokens kept from its own cache, donor slot or -1,
    tokens to take from the donor).

    The slot whose cache shares the longest usable prefix wins (least recently used on ties);
    a longer prefix in any other slot, idle or running, makes that slot the donor (``share``:
    the cache is unified, so that llama.cpp can copy part of a sequence).
    """
    limit = s.tokens.size - 1  # the last prompt token is decoded again, for its logits
    view = ctx.tokens.view
    best, best_keep = free[0], -1
    for i in free:
        keep = _reusable(ctx, i, min(common_prefix(s.tokens, view(i)), limit))
        if keep > best_keep or (keep == best_keep and last_used[i] < last_used[best]):
            best, best_keep = i, keep
    donor, donor_keep = -1, best_keep
    for i, r in enumerate(slots if share else ()):
        if i == best:
            continue
        have = donor_tokens(r) if r is not None else view(i)
        n = min(common_prefix(s.tokens, have), limit)
        if n > donor_keep and (r is not None and r.prefilling or _reusable(ctx, i, n) == n):
            donor, donor_keep = i, n
    if donor < 0 or donor_keep <= best_keep:
        return best, best_keep, -1, 0
    return best, best_keep, donor, donor_keep


def copy_prefix(ctx: Context, src: int, dst: int, n: int) -> bool:
    """Make the first ``n`` positions of ``src`` the whole of ``dst`` (shared cells, no compute);
    False where the source no longer holds them (a sliding window moved on)."""
    if _reusable(ctx, src, n) != n or len(ctx.tokens.view(src)) < n:
        return False
    mem = ctx.memory
    mem.seq_rm(dst, -1, -1)
    mem.seq_cp(src, dst, 0, n)
    return True


def shift(ctx: Context, s: RequestState) -> bool:
    """Shift out half of the tokens after ``n_keep`` (as llama-server's context shift does);
    False where the memory cannot shift."""
    mem = ctx.memory
    if not mem.can_shift:
        return False
    keep = s.req.n_keep
    discard = (s.n_pos - keep) // 2
    if discard < 1:
        return False
    mem.seq_rm(s.slot, keep, keep + discard)
    mem.seq_add(s.slot, keep + discard, s.n_pos, -discard)
    s.n_pos -= discard
    s.shifted = True  # shifted positions are no prefix anyone can reuse
    ctx.tokens.forget(s.slot)
    return True
