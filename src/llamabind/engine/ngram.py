"""N-gram (prompt-lookup) drafts: the tokens that followed the last occurrence of the sequence's
latest n-gram, a free guess that is often right when the output copies from the input."""

from __future__ import annotations

import numpy as np


class NgramDrafter:
    """Indexes every n-gram of a request's tokens (prompt, then output) by where it last ended.

    ``draft(k)`` looks up the newest tokens' n-gram (longest first, ``n_max`` down to
    ``n_min``) and proposes the ``k`` tokens that followed its previous occurrence.
    Appending a token updates the index in O(n_max).
    """

    __slots__ = ("hist", "index", "n_min", "n_max")

    def __init__(self, prompt: np.ndarray, n_min: int = 2, n_max: int = 4) -> None:
        self.hist: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.n_min, self.n_max = n_min, n_max
        self.extend(prompt.tolist())

    def extend(self, tokens: list[int]) -> None:
        hist, index = self.hist, self.index
        for t in tokens:
            end = len(hist)
            # n-grams ending at the previous token are now followed by ``t`` (at position ``end``)
            for n in range(self.n_min, self.n_max + 1):
                if end >= n:
                    index[tuple(hist[end - n:end])] = end
            hist.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens to try after the current end (none when no n-gram recurs)."""
        hist, end = self.hist, len(self.hist)
        for n in range(self.n_max, self.n_min - 1, -1):
            if end < n:
                continue
            at = self.index.get(tuple(hist[end - n:end]))
            if at is not None and at < end:
                return hist[at:at + k]
        return []
