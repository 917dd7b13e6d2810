"""Batches of tokens (or embeddings) for llama_decode, held in numpy arrays.

The ``llama_batch`` struct points straight into the arrays, so filling a batch is numpy
slicing, with no per-token Python loop and no llama_batch_init/free to pair up.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .raw import ffi
from .errors import InvalidInputError
from .vocab import as_tokens


class Batch:
    """Room for ``capacity`` tokens, each in up to ``n_seq_max`` sequences.

    With ``embd`` > 0 the batch carries float32 input embeddings of that width instead
    of token ids (``batch.embd``). The arrays (``token``, ``pos``, ``n_seq_id``, ``seq_id``,
    ``logits``) are views to write into: the C struct points at the memory behind them, and
    re-typing or reshaping a view changes only the view. ``n_tokens`` says how many rows are
    used (0..capacity).
    """

    __slots__ = ("capacity", "n_seq_max", "_token", "_embd", "_pos", "_n_seq_id", "_seq_id", "_logits",
                 "_seq_ptrs", "_struct", "_n_tokens", "_views")

    def __init__(self, capacity: int, n_seq_max: int = 1, embd: int = 0) -> None:
        for name, v in (("capacity", capacity), ("n_seq_max", n_seq_max), ("embd", embd)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidInputError(f"batch {name} must be an int, not {type(v).__name__}")
        if capacity < 1 or n_seq_max < 1 or embd < 0:
            raise InvalidInputError("batch capacity and n_seq_max must be >= 1, embd >= 0")
        if capacity * max(n_seq_max, embd, 1) > 1 << 31:
            raise InvalidInputError("batch too large")
        self.capacity = int(capacity)
        self.n_seq_max = int(n_seq_max)
        self._token = np.zeros(capacity, dtype=np.int32)
        self._embd = np.zeros((capacity, embd), dtype=np.float32) if embd else None
        self._pos = np.zeros(capacity, dtype=np.int32)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        self._seq_id = np.zeros((capacity, n_seq_max), dtype=np.int32)
        self._logits = np.zeros(capacity, dtype=np.int8)
        # One pointer per row into seq_id, computed by numpy rather than a loop.
        self._seq_ptrs = (np.arange(capacity, dtype=np.uint64) * np.uint64(self._seq_id.strides[0])
                          + np.uint64(self._seq_id.ctypes.data))
        s = ffi.new("llama_batch *")
        s.token = ffi.NULL if embd else ffi.cast("llama_token *", self._token.ctypes.data)
        s.embd = ffi.cast("float *", self._embd.ctypes.data) if self._embd is not None else ffi.NULL
        s.pos = ffi.cast("llama_pos *", self._pos.ctypes.data)
        s.n_seq_id = ffi.cast("int32_t *", self._n_seq_id.ctypes.data)
        s.seq_id = ffi.cast("llama_seq_id **", self._seq_ptrs.ctypes.data)
        s.logits = ffi.cast("int8_t *", self._logits.ctypes.data)
        self._struct = s
        self._n_tokens = 0
        arrays = (self._token, self._embd, self._pos, self._n_seq_id, self._seq_id, self._logits)
        self._views = tuple(None if a is None else a.view() for a in arrays)

    token = property(lambda self: self._views[0], doc="token ids, int32 (capacity,)")
    embd = property(lambda self: self._views[1], doc="input embeddings, float32 (capacity, width), or None")
    pos = property(lambda self: self._views[2], doc="positions, int32 (capacity,)")
    n_seq_id = property(lambda self: self._views[3], doc="how many sequences each row belongs to, int32")
    seq_id = property(lambda self: self._views[4], doc="sequence ids, int32 (capacity, n_seq_max)")
    logits = property(lambda self: self._views[5], doc="whether each row outputs logits/embeddings, int8")

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= self.capacity:
            raise InvalidInputError(f"n_tokens must be an int in [0, {self.capacity}], not {n!r}")
        self._n_tokens = int(n)

    def clear(self) -> None:
        self._n_tokens = 0

    def add(self, tokens: Iterable[int] | np.ndarray, pos0: int | np.ndarray, seq_id: int | Iterable[int] = 0,
            logits: bool | str | np.ndarray = "last") -> slice:
        """Append tokens of one or more sequences at positions ``pos0, pos0+1, ...`` (or given positions).

        ``logits``: ``"last"`` (only the final token), ``"all"``, False, or a bool array.
        Returns the slice of rows written.
        """
        toks = as_tokens(tokens)
        n = toks.size
        return self._add(n, pos0, seq_id, logits, toks=toks)

    def add_embd(self, embd: np.ndarray, pos0: int | np.ndarray, seq_id: int | Iterable[int] = 0,
                 logits: bool | str | np.ndarray = "last") -> slice:
        """Append rows of input embeddings (a batch made with ``embd`` > 0)."""
        if self.embd is None:
            raise InvalidInputError("this batch holds tokens; create it with embd=n_embd")
        arr = np.asarray(embd, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.embd.shape[1]:
            raise InvalidInputError(f"embeddings must have shape (n, {self.embd.shape[1]}), got {arr.shape}")
        return self._add(arr.shape[0], pos0, seq_id, logits, embd=arr)

    def _add(self, n: int, pos0, seq_id, logits, toks=None, embd=None) -> slice:
        start = self.n_tokens
        end = start + n
        if n == 0:
            raise InvalidInputError("cannot add an empty token list to a batch")
        if end > self.capacity:
            raise InvalidInputError(f"batch overflow: {end} tokens > capacity {self.capacity}")
        rows = slice(start, end)
        if toks is not None:
            if self._embd is not None:
                raise InvalidInputError("this batch holds embeddings; use add_embd")
            self._token[rows] = toks
        elif self._embd is not None:
            self._embd[rows] = embd
        if np.isscalar(pos0):
            if isinstance(pos0, bool) or not isinstance(pos0, (int, np.integer)) or not 0 <= pos0 < 2**31 - n:
                raise InvalidInputError(f"pos0 must be a position in [0, 2**31), not {pos0!r}")
            self._pos[rows] = np.arange(pos0, pos0 + n, dtype=np.int32)
        else:
            pos = np.asarray(pos0)
            if pos.shape != (n,):
                raise InvalidInputError(f"positions must have shape ({n},), got {pos.shape}")
            self._pos[rows] = pos
        try:
            seqs = np.atleast_1d(np.asarray(seq_id, dtype=np.int32))
        except (OverflowError, TypeError, ValueError):
            raise InvalidInputError(f"sequence ids must be int32 values, not {seq_id!r}") from None
        if seqs.ndim != 1 or not 1 <= seqs.size <= self.n_seq_max:
            raise InvalidInputError(f"a token belongs to 1..{self.n_seq_max} sequences, got {seqs.size}")
        self._seq_id[rows, : seqs.size] = seqs
        self._n_seq_id[rows] = seqs.size
        if isinstance(logits, str):
            if logits not in ("last", "all"):
                raise InvalidInputError(f"logits must be 'last', 'all', a bool or a bool array, not {logits!r}")
            self._logits[rows] = 1 if logits == "all" else 0
            if logits == "last":
                self._logits[end - 1] = 1
        else:
            self._logits[rows] = np.asarray(logits, dtype=np.int8)
        self.n_tokens = end
        return rows

    def validate(self, n_vocab: int, n_seq_max: int, n_embd: int) -> None:
        """InvalidInputError unless the used rows are fit for a context with these sizes: token ids,
        embedding width, sequence ids and counts, positions (read from the memory C sees)."""
        n = self._n_tokens
        if self._embd is None:
            toks = self._token[:n]
            if int(toks.min()) < 0 or int(toks.max()) >= n_vocab:
                bad = toks[(toks < 0) | (toks >= n_vocab)][0]
                raise InvalidInputError(f"token id {int(bad)} out of range [0, {n_vocab})")
        elif self._embd.shape[1] != n_embd:
            raise InvalidInputError(f"batch embeddings have width {self._embd.shape[1]}, model n_embd is {n_embd}")
        counts = self._n_seq_id[:n]
        if int(counts.min()) < 1 or int(counts.max()) > self.n_seq_max:
            raise InvalidInputError("n_seq_id out of range")
        used = self._seq_id[:n][np.arange(self.n_seq_max) < counts[:, None]]
        if used.size and (int(used.min()) < 0 or int(used.max()) >= n_seq_max):
            raise InvalidInputError(f"sequence id out of range [0, {n_seq_max}) (raise n_seq_max)")
        if int(self._pos[:n].min()) < 0:
            raise InvalidInputError("negative position in batch")

    def output_rows(self) -> np.ndarray:
        """The used rows that ask for logits/embeddings."""
        return np.flatnonzero(self._logits[: self._n_tokens])

    @property
    def n_outputs(self) -> int:
        """How many rows request logits/embeddings."""
        return int(np.count_nonzero(self._logits[: self._n_tokens]))

    def struct(self):
        """The ``llama_batch`` value to pass to llama_decode (valid while this object lives)."""
        self._struct.n_tokens = self._n_tokens
        return self._struct[0]
