"""A context's memory (``llama_memory_t``: KV cache or recurrent state) and the tokens known
to be in it per sequence (what prefix reuse may keep)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from .raw import lib
from .errors import InvalidInputError

if TYPE_CHECKING:
    from .context import Context


class CachedTokens:
    """The tokens each sequence holds in the KV cache, as far as llamabind knows.

    Owned by one Context; every memory operation and decode loop keeps it true, so that a
    new prompt reuses exactly the prefix that is really there. A sequence that llamabind
    cannot vouch for (media chunks, shifted positions) is simply absent.
    """

    __slots__ = ("_seqs",)

    def __init__(self) -> None:
        self._seqs: dict[int, list[int]] = {}

    def get(self, seq_id: int) -> list[int]:
        """A copy of the tokens of ``seq_id`` (empty if unknown)."""
        return list(self._seqs.get(seq_id, ()))

    def set(self, seq_id: int, tokens: Iterable[int]) -> None:
        self._seqs[seq_id] = [int(t) for t in tokens]

    def bind(self, seq_id: int, tokens: list[int]) -> None:
        """Make ``tokens`` (kept, not copied) the record of ``seq_id``: a decode loop that appends
        to its own list keeps the record true at no extra cost."""
        self._seqs[seq_id] = tokens

    def view(self, seq_id: int) -> list[int]:
        """The record of ``seq_id`` itself (empty if unknown); read it, do not change it."""
        return self._seqs.get(seq_id, [])

    def extend(self, seq_id: int, tokens: Iterable[int]) -> None:
        self._seqs.setdefault(seq_id, []).extend(int(t) for t in tokens)

    def append(self, seq_id: int, token: int) -> None:
        self._seqs.setdefault(seq_id, []).append(token)

    def truncate(self, seq_id: int, n: int) -> None:
        if seq_id in self._seqs:
            del self._seqs[seq_id][n:]

    def forget(self, seq_id: int) -> None:
        """Drop what is known of ``seq_id`` (-1: of every sequence)."""
        if seq_id == -1:
            self._seqs.clear()
        else:
            self._seqs.pop(seq_id, None)

    def keep_only(self, seq_id: int) -> None:
        kept = self._seqs.get(seq_id)
        self._seqs.clear()
        if kept is not None:
            self._seqs[seq_id] = kept

    def common_prefix(self, seq_id: int, tokens: np.ndarray) -> int:
        """Length of the longest prefix of ``tokens`` that ``seq_id`` already holds."""
        have = self._seqs.get(seq_id)
        if not have:
            return 0
        n = min(len(have), tokens.size)
        diff = np.flatnonzero(np.asarray(have[:n], dtype=np.int32) != tokens[:n])
        return int(diff[0]) if diff.size else n


class Memory:
    """The context's memory: sequence operations, checked before llama.cpp can assert on them.

    Every call holds the context (no decode runs meanwhile) and keeps ``ctx.cached_tokens``
    true. Obtained as ``ctx.memory``; it holds the context, the context does not hold it.
    """

    __slots__ = ("_ctx",)

    def __init__(self, ctx: "Context") -> None:
        self._ctx = ctx

    @property
    def ptr(self):
        """The raw ``llama_memory_t``; ClosedError once the context is closed."""
        return lib.llama_get_memory(self._ctx.ptr)

    def _check_seq(self, seq_id: int, allow_all: bool = False) -> None:
        self._ctx.check_seq(seq_id, allow_all)

    @staticmethod
    def _check_range(p0: int, p1: int) -> None:
        for name, v in (("p0", p0), ("p1", p1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidInputError(f"{name} must be an int position, not {type(v).__name__}")
            if not -2**31 <= v < 2**31:
                raise InvalidInputError(f"{name}={v} is outside the int32 positions")
        if p0 >= 0 and p1 >= 0 and p1 < p0:
            raise InvalidInputError(f"empty or reversed range [{p0}, {p1})")

    def clear(self, data: bool = True) -> None:
        """Drop every sequence (``data`` also zeroes the buffers)."""
        with self._ctx.hold():
            lib.llama_memory_clear(self.ptr, data)
            self._ctx.tokens.forget(-1)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (-1: all sequences / open ends); False if impossible."""
        self._check_seq(seq_id, allow_all=True)
        self._check_range(p0, p1)
        with self._ctx.hold():
            ok = bool(lib.llama_memory_seq_rm(self.ptr, seq_id, p0, p1))
            tokens = self._ctx.tokens
            for s in (range(self._ctx.n_seq_max) if seq_id == -1 else [seq_id]):
                if ok and p1 < 0 and p0 > 0:
                    tokens.truncate(s, p0)
                else:
                    tokens.forget(s)
        return ok

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make positions [p0, p1) of sequence ``dst`` those of ``src``.

        ``dst``'s own cells in the range are removed first (llama.cpp would otherwise keep them
        beside the copy, and the record of what ``dst`` holds would lie). With a KV cache split per
        sequence (``kv_unified=False``, ``n_seq_max > 1``) llama.cpp copies whole sequences only:
        a partial range is refused there.
        """
        self._check_seq(src)
        self._check_seq(dst)
        self._check_range(p0, p1)
        ctx = self._ctx
        if src != dst and ctx.n_seq_max > 1 and not ctx.kv_unified and (p0 > 0 or p1 >= 0):
            raise InvalidInputError("seq_cp of a partial range needs a unified KV cache (kv_unified=True); "
                                    "this context keeps one cache per sequence and copies whole sequences only")
        with ctx.hold():
            if src == dst:
                return
            mem = self.ptr
            lib.llama_memory_seq_rm(mem, dst, p0, p1)
            lib.llama_memory_seq_cp(mem, src, dst, p0, p1)
            tokens = ctx.tokens
            if p0 <= 0 and p1 < 0 and tokens.view(src):
                tokens.set(dst, tokens.view(src))
            else:
                tokens.forget(dst)

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence except ``seq_id``."""
        self._check_seq(seq_id)
        with self._ctx.hold():
            lib.llama_memory_seq_keep(self.ptr, seq_id)
            self._ctx.tokens.keep_only(seq_id)

    def _check_shift(self, seq_id: int, p0: int, p1: int) -> None:
        self._check_seq(seq_id)  # llama.cpp asserts on -1 here
        self._check_range(p0, p1)
        if not self.can_shift:
            raise InvalidInputError("this model's memory cannot shift positions")

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions [p0, p1) of a sequence by ``delta`` (needs ``can_shift``)."""
        self._check_shift(seq_id, p0, p1)
        self._check_range(delta, -1)
        with self._ctx.hold():
            lib.llama_memory_seq_add(self.ptr, seq_id, p0, p1, delta)
            self._ctx.tokens.forget(seq_id)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide positions [p0, p1) of a sequence by ``d`` (needs ``can_shift``)."""
        self._check_shift(seq_id, p0, p1)
        self._check_range(d, -1)
        if d < 1:
            raise InvalidInputError("divisor must be >= 1")
        with self._ctx.hold():
            lib.llama_memory_seq_div(self.ptr, seq_id, p0, p1, d)
            self._ctx.tokens.forget(seq_id)

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position of the sequence in memory, -1 if empty."""
        self._check_seq(seq_id)
        with self._ctx.hold():
            return lib.llama_memory_seq_pos_min(self.ptr, seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position of the sequence in memory, -1 if empty."""
        self._check_seq(seq_id)
        with self._ctx.hold():
            return lib.llama_memory_seq_pos_max(self.ptr, seq_id)

    @property
    def can_shift(self) -> bool:
        with self._ctx.hold():
            return bool(lib.llama_memory_can_shift(self.ptr))
