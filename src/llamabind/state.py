"""Saving and restoring a context's state (KV cache, outputs, RNG): whole, per sequence, or to a file.

A mixin of Context: every call holds the context, and keeps ``ctx.tokens`` true, so that a
restored sequence 0 is reused as a cached prefix when its tokens are given.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputNotFoundError, InvalidInputError, LlamaError
from .raw import fail, ffi, lib

if TYPE_CHECKING:
    from .memory import CachedTokens


class ContextState:
    """State methods of Context (``ctx.state_save()``, ``ctx.seq_state_load(...)``, ...)."""

    if TYPE_CHECKING:
        _tokens: CachedTokens
        n_ctx: int
        ptr: Any

        def hold(self) -> Any: ...
        def check_seq(self, seq_id: int, allow_all: bool = False) -> None: ...
        def set_outputs(self, n_outputs: int, rows: np.ndarray | None = None) -> None: ...

    def state_save(self) -> bytes:
        """The whole context state (KV cache, outputs, RNG) as bytes."""
        with self.hold():
            size = lib.llama_state_get_size(self.ptr)
            buf = bytearray(size)
            n = lib.llama_state_get_data(self.ptr, ffi.from_buffer("uint8_t[]", buf), size)
        return bytes(buf[:n])

    def state_load(self, data: bytes, tokens: Any = None) -> None:
        """Restore a state saved by ``state_save`` (same model and context parameters).

        ``tokens``: what sequence 0 held when saved (``cached_tokens(0)``), so that ``generate``
        reuses it as a cached prefix; without it the next generation decodes from scratch.
        """
        data = _as_bytes(data)
        with self.hold():
            n = lib.llama_state_set_data(self.ptr, ffi.from_buffer("uint8_t[]", data), len(data))
            self._tokens.forget(-1)
            self.set_outputs(0)
            if n == 0:
                fail(InvalidInputError, "state data rejected", 'wrong size or model')
            if tokens is not None:
                self._tokens.set(0, tokens)

    def cached_tokens(self, seq_id: int = 0) -> list[int]:
        """The tokens ``generate`` knows to be in the KV cache of a sequence (its reusable prefix)."""
        self.check_seq(seq_id)
        return self._tokens.get(seq_id)

    @property
    def tokens(self) -> CachedTokens:
        """The per-sequence record of cached tokens that prefix reuse trusts (kept by llamabind)."""
        return self._tokens

    def seq_state_save(self, seq_id: int) -> bytes:
        """One sequence's KV state as bytes."""
        self.check_seq(seq_id)
        with self.hold():
            size = lib.llama_state_seq_get_size(self.ptr, seq_id)
            buf = bytearray(size)
            n = lib.llama_state_seq_get_data(self.ptr, ffi.from_buffer("uint8_t[]", buf), size, seq_id)
        return bytes(buf[:n])

    def seq_state_load(self, data: bytes, seq_id: int) -> None:
        """Load a sequence state saved by ``seq_state_save`` into ``seq_id``."""
        self.check_seq(seq_id)
        data = _as_bytes(data)
        with self.hold():
            n = lib.llama_state_seq_set_data(self.ptr, ffi.from_buffer("uint8_t[]", data), len(data), seq_id)
            self._tokens.forget(seq_id)
            if n == 0:
                fail(InvalidInputError, "sequence state rejected", 'wrong size or model')

    def state_save_file(self, path: str | os.PathLike, tokens: Any = None) -> None:
        """Save the context state and ``tokens`` (default: the tokens of sequence 0 in the cache) to a file."""
        toks = np.ascontiguousarray(self._tokens.get(0) if tokens is None else tokens, dtype=np.int32)
        with self.hold():
            ok = lib.llama_state_save_file(self.ptr, os.fsencode(path), ffi.from_buffer("llama_token[]", toks), toks.size)
        if not ok:
            fail(LlamaError, f"could not save state to {path}")

    def state_load_file(self, path: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
        """Load a state file; returns the tokens saved with it, which ``generate`` then reuses
        as the cached prefix of sequence 0."""
        if not os.path.isfile(path):
            raise InputNotFoundError(f"state file not found: {path}")
        cap = max_tokens or self.n_ctx
        if cap < 1:
            raise InvalidInputError("max_tokens must be >= 1")
        toks = np.zeros(cap, dtype=np.int32)
        n = ffi.new("size_t *")
        with self.hold():
            ok = lib.llama_state_load_file(self.ptr, os.fsencode(path), ffi.from_buffer("llama_token[]", toks), cap, n)
            self._tokens.forget(-1)
            self.set_outputs(0)
            if not ok:
                fail(InvalidInputError, f"could not load state from {path}")
            self._tokens.set(0, toks[: n[0]])
        return toks[: n[0]].copy()


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InvalidInputError(f"state data must be bytes, not {type(data).__name__}")
