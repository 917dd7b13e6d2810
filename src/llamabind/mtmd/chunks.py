"""Chunks (``mtmd_input_chunks``): the tokenized prompt, text and media pieces in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .._handle import Handle
from ..raw import ffi, lib
from .types import ChunkType, _str_or_none

if TYPE_CHECKING:
    from .context import MtmdContext


# -- chunks -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkInfo:
    """What one chunk is, as plain values (comparable across runs)."""

    type: ChunkType
    n_tokens: int
    n_pos: int
    id: str | None
    tokens: tuple[int, ...] | None  # text chunks only


class Chunk:
    """A view of one input chunk of a Chunks list (valid while the list is open)."""

    __slots__ = ("_chunks", "_index")

    def __init__(self, chunks: "Chunks", index: int) -> None:
        self._chunks, self._index = chunks, index

    @property
    def ptr(self):
        return lib.mtmd_input_chunks_get(self._chunks.ptr, self._index)

    type = property(lambda self: ChunkType(lib.mtmd_input_chunk_get_type(self.ptr)))
    n_tokens = property(lambda self: int(lib.mtmd_input_chunk_get_n_tokens(self.ptr)),
                        doc="tokens (text) or embeddings (media) this chunk puts into the context")
    n_pos = property(lambda self: int(lib.mtmd_input_chunk_get_n_pos(self.ptr)),
                     doc="positions it takes (differs from n_tokens with M-RoPE)")
    id = property(lambda self: _str_or_none(lib.mtmd_input_chunk_get_id(self.ptr)) or None,
                  doc="the media id (None for text)")

    @property
    def tokens(self) -> np.ndarray | None:
        """The token ids of a text chunk (a copy), None for media."""
        ptr = self.ptr
        if lib.mtmd_input_chunk_get_type(ptr) != lib.MTMD_INPUT_CHUNK_TYPE_TEXT:
            return None
        n = ffi.new("size_t *")
        p = lib.mtmd_input_chunk_get_tokens_text(ptr, n)
        if n[0] == 0:
            return np.empty(0, np.int32)
        return np.frombuffer(ffi.buffer(p, n[0] * 4), dtype=np.int32).copy()

    def info(self) -> ChunkInfo:
        toks = self.tokens
        return ChunkInfo(self.type, self.n_tokens, self.n_pos, self.id,
                         None if toks is None else tuple(int(t) for t in toks))

    def __repr__(self) -> str:
        return f"<Chunk {self.type.name.lower()} n_tokens={self.n_tokens} n_pos={self.n_pos}>"


class Chunks(Handle):
    """The input chunks of one tokenized multimodal prompt (``MtmdContext.tokenize``)."""

    def __init__(self, ptr, mctx: MtmdContext) -> None:
        super().__init__(ptr, lib.mtmd_input_chunks_free)
        self.mctx = mctx

    def __len__(self) -> int:
        return int(lib.mtmd_input_chunks_size(self.ptr))

    def __getitem__(self, i: int) -> Chunk:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"chunk index {i} out of range ({n} chunks)")
        return Chunk(self, i % n)

    def __iter__(self) -> Iterator[Chunk]:
        return (Chunk(self, i) for i in range(len(self)))

    @property
    def n_tokens(self) -> int:
        """Tokens and media embeddings in all chunks (what the prompt costs in the KV cache)."""
        return int(lib.mtmd_helper_get_n_tokens(self.ptr))

    @property
    def n_pos(self) -> int:
        """Positions all chunks take (``n_past`` advances by this)."""
        return int(lib.mtmd_helper_get_n_pos(self.ptr))

    def info(self) -> list[ChunkInfo]:
        return [c.info() for c in self]

    def __repr__(self) -> str:
        if self.closed:
            return "<Chunks closed>"
        kinds = ",".join(c.type.name.lower() for c in self)
        return f"<Chunks [{kinds}] n_tokens={self.n_tokens}>"
