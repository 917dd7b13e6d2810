"""N-gram (prompt-lookup) drafts: the tokens that followed the last occurrence of the sequence's
latest n-gram, a free guess that is often right when the output copies from the input."""

from __future__ import annotations

import numpy as np


class NgramDrafter:
    """Indexes every n-gram of a request's tokens (prompt, then output) by where its last two
    occurrences ended.

    ``draft(k)`` looks up the newest tokens' n-gram (longest first, ``n_max`` down to
    ``n_min``) and proposes the ``k`` tokens that followed its last occurrence, cut where the
    occurrence before that went on differently (an ambiguous continuation is a likely miss, and
    every drafted token costs a row of logits to verify). Appending a token updates the index in
    O(n_max).
    """

    __slots__ = ("hist", "index", "prev", "n_min", "n_max")

    def __init__(self, prompt: np.ndarray, n_min: int = 2, n_max: int = 4) -> None:
        self.hist: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where its last occurrence ended
        self.prev: dict[tuple[int, ...], int] = {}   # n-gram -> where the occurrence before ended
        self.n_min, self.n_max = n_min, n_max
        self.extend(prompt.tolist())

    def extend(self, tokens: list[int]) -> None:
        hist, index, prev = self.hist, self.index, self.prev
        for t in tokens:
            end = len(hist)
            # n-grams ending at the previous token are now followed by ``t`` (at position ``end``)
            for n in range(self.n_min, self.n_max + 1):
                if end >= n:
                    key = tuple(hist[end - n:end])
                    last = index.get(key)
                    if last is not None:
                        prev[key] = last
                    index[key] = end
            hist.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens to try after the current end (none when no n-gram recurs)."""
        hist, end = self.hist, len(self.hist)
        for n in range(self.n_max, self.n_min - 1, -1):
            if end < n:
                continue
            key = tuple(hist[end - n:end])
            at = self.index.get(key)
            if at is None or at >= end:
                continue
            d = hist[at:at + k]
            before = self.prev.get(key)
            if before is not None:
                j = 0
                while j < len(d) and before + j < end and hist[before + j] == d[j]:
                    j += 1
                del d[max(j, 1):]
            return d
        return []
