"""Multimodal input through libmtmd: projectors, bitmaps (images, audio), chunks, generation.

libmtmd does the model-specific work (preprocessing, the vision/audio encoder, the
projector, begin/end-of-media tokens, non-causal attention, M-RoPE positions), so every
model family it supports works here without per-family code::

    mctx = MtmdContext(model, "mmproj.gguf")
    img = Bitmap.from_file(mctx, "cat.jpg")          # or Bitmap.from_array(rgb_uint8_hxwx3)
    chunks = mctx.tokenize(f"{mctx.marker} What is this?", [img])
    n_past = eval_chunks(ctx, chunks)                  # encode the media, decode everything
    for ev in llamabind.generate_after(ctx, n_past, n_prompt=chunks.n_tokens): ...

or, in one call, ``generate(ctx, mctx, prompt, [img])`` / ``generate(ctx, mctx,
messages=[{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
{"type": "text", "text": "What is this?"}]}])``.

Bad input is refused before libmtmd or llama.cpp can abort on it: InvalidInputError for
arrays and prompts, MediaError (both an MtmdError and an InvalidInputError) for media that
cannot be decoded or that the projector does not take, MtmdError for libmtmd failures.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from . import _params
from ._handle import Handle
from .raw import check_decode, clear_errors, fail, ffi, lib, reason
from .context import Context
from .errors import (
    AbortedError,
    ContextOverflowError,
    InvalidInputError,
    ModelNotFoundError,
    MtmdError,
)
from .generate import Cancel, DoneEvent, TokenEvent, Timings, generate_after
from .gguf_check import check_gguf
from .model import Model, _Progress
from .sampler import Sampler

__all__ = [
    "MtmdContext", "Bitmap", "Chunks", "Chunk", "ChunkInfo", "ChunkType", "MediaError",
    "default_marker", "eval_chunks", "generate", "complete", "render_chat",
]

Media = Union["Bitmap", np.ndarray, bytes, bytearray, memoryview, str, os.PathLike]


class MediaError(MtmdError, InvalidInputError):
    """Media that cannot be decoded (corrupt, unsupported format) or that the projector does not take."""


class ChunkType(enum.IntEnum):
    TEXT = 0   # MTMD_INPUT_CHUNK_TYPE_TEXT
    IMAGE = 1  # MTMD_INPUT_CHUNK_TYPE_IMAGE
    AUDIO = 2  # MTMD_INPUT_CHUNK_TYPE_AUDIO


assert (ChunkType.TEXT, ChunkType.IMAGE, ChunkType.AUDIO) == (
    lib.MTMD_INPUT_CHUNK_TYPE_TEXT, lib.MTMD_INPUT_CHUNK_TYPE_IMAGE, lib.MTMD_INPUT_CHUNK_TYPE_AUDIO)


def default_marker() -> str:
    """libmtmd's default media marker (``<__media__>``)."""
    return ffi.string(lib.mtmd_default_marker()).decode()


def _str_or_none(p) -> str | None:
    return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")


# -- the projector ----------------------------------------------------------------------------

class MtmdContext(Handle):
    """A multimodal projector (mmproj GGUF) loaded for one text model.

    Keyword arguments follow ``mtmd_context_params``: ``use_gpu`` (offload the encoder),
    ``n_threads`` (default: all CPUs), ``media_marker`` (default ``<__media__>``),
    ``print_timings``, ``warmup`` (run one encode at load), ``flash_attn`` (``"auto"``,
    ``"enabled"``, ``"disabled"`` or a bool), ``image_min_tokens``/``image_max_tokens``
    (dynamic-resolution models), ``batch_max_tokens``; ``progress`` is called with a
    fraction while loading (False cancels). Other keywords set fields of
    ``mtmd_context_params`` by name. The context is closed before its model.

    A projector that does not fit the model (embedding width) or cannot be loaded raises
    MtmdError; a missing file raises ModelNotFoundError.
    """

    def __init__(self, model: Model, mmproj: str | os.PathLike, *, use_gpu: bool = True,
                 n_threads: int | None = None, media_marker: str | None = None,
                 print_timings: bool = False, warmup: bool = True, flash_attn: bool | str | None = None,
                 image_min_tokens: int | None = None, image_max_tokens: int | None = None,
                 batch_max_tokens: int | None = None, progress=None, check: bool = True,
                 **params: Any) -> None:
        path = os.fspath(mmproj)
        if not os.path.exists(path):
            raise ModelNotFoundError(f"projector file not found: {path}")
        if not os.path.isfile(path):
            raise MtmdError(f"projector is not a regular file: {path}")
        if n_threads is not None and n_threads < 1:
            raise InvalidInputError(f"n_threads must be >= 1, not {n_threads}")
        if check:
            check_gguf(path)
        mparams = lib.mtmd_context_params_default()
        values: dict[str, Any] = {"use_gpu": bool(use_gpu), "print_timings": bool(print_timings),
                                  "n_threads": n_threads or os.cpu_count() or 4, "warmup": bool(warmup)}
        if flash_attn is not None:
            values["flash_attn_type"] = ("enabled" if flash_attn else "disabled") if isinstance(flash_attn, bool) else flash_attn
        for key, value in (("image_min_tokens", image_min_tokens), ("image_max_tokens", image_max_tokens),
                           ("batch_max_tokens", batch_max_tokens)):
            if value is not None:
                values[key] = value
        values.update(params)
        _params.apply(mparams, "struct mtmd_context_params", values)
        marker = None  # kept alive until mtmd_init_from_file has copied it
        if media_marker is not None:
            if not isinstance(media_marker, str) or not media_marker or "\0" in media_marker:
                raise InvalidInputError("media_marker must be a non-empty string without NUL")
            marker = ffi.new("char[]", media_marker.encode("utf-8"))
            mparams.media_marker = marker
        state = _Progress.attach(mparams, progress)
        clear_errors()
        ptr = lib.mtmd_init_from_file(path.encode(), model.ptr, mparams)
        if ptr == ffi.NULL:
            if state is not None and state.error is not None:
                raise MtmdError(f"{path}: progress callback raised {state.error!r}") from state.error
            if state is not None and getattr(state, "cancelled", False):
                clear_errors()
                raise MtmdError(f"{path}: load cancelled by the progress callback")
            fail(MtmdError, f"libmtmd could not load the projector {path}")
        super().__init__(ptr, lib.mtmd_free, parent=model)
        self.model = model
        self.path = path
        self._lock = threading.Lock()  # encoding is not thread-safe (the context holds the output)
        self.supports_vision: bool = bool(lib.mtmd_support_vision(ptr))
        self.supports_audio: bool = bool(lib.mtmd_support_audio(ptr))
        rate = lib.mtmd_get_audio_sample_rate(ptr)
        self.audio_sample_rate: int | None = rate if rate > 0 else None
        self.marker: str = ffi.string(lib.mtmd_get_marker(ptr)).decode("utf-8")
        self.uses_mrope: bool = bool(lib.mtmd_decode_use_mrope(ptr))

    def uses_non_causal(self, chunk: "Chunk | None" = None) -> bool:
        """Whether media (default: an image) is decoded with non-causal attention (Gemma 3 ...)."""
        return bool(lib.mtmd_decode_use_non_causal(self.ptr, ffi.NULL if chunk is None else chunk.ptr))

    # -- convenience constructors ---------------------------------------------------------
    def bitmap(self, media: Media, id: str | None = None) -> "Bitmap":
        """A Bitmap from a file path, encoded bytes, a uint8 (H, W, 3) image or float32 PCM array."""
        return Bitmap.load(self, media, id=id)

    def tokenize(self, prompt: str, bitmaps: Sequence["Bitmap"] = (), *, add_special: bool = True,
                 parse_special: bool = True) -> "Chunks":
        """Split ``prompt`` at its media markers and tokenize it with ``bitmaps`` into input chunks.

        The number of markers must equal the number of bitmaps (InvalidInputError otherwise);
        each bitmap must be of a kind the projector takes (MediaError otherwise).
        """
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be str, not {type(prompt).__name__}")
        try:
            data = prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(f"prompt is not valid UTF-8 (lone surrogate at index {e.start})") from None
        bitmaps = list(bitmaps)
        n_markers = prompt.count(self.marker)
        if n_markers != len(bitmaps):
            raise InvalidInputError(f"the prompt has {n_markers} media marker(s) {self.marker!r} "
                                    f"but {len(bitmaps)} bitmap(s) were given")
        for i, b in enumerate(bitmaps):
            if not isinstance(b, Bitmap):
                raise InvalidInputError(f"bitmap {i} is a {type(b).__name__}, not a Bitmap")
            self._check_kind(b.is_audio, f"bitmap {i}")
            if b.is_audio and b.nx < 2:  # libmtmd aborts (GGML_ASSERT) on a 1-sample clip
                raise MediaError(f"bitmap {i} holds {b.nx} audio samples; at least 2 are needed")
        ptrs = ffi.new("mtmd_bitmap *[]", [b.ptr for b in bitmaps] or [ffi.NULL])
        text = ffi.new("mtmd_input_text *")
        cbuf = ffi.new("char[]", data)
        text.text, text.text_len = cbuf, len(data)
        text.add_special, text.parse_special = bool(add_special), bool(parse_special)
        chunks_ptr = lib.mtmd_input_chunks_init()
        if chunks_ptr == ffi.NULL:
            raise MemoryError("mtmd_input_chunks_init failed")
        chunks = Chunks(chunks_ptr, self)
        clear_errors()
        rc = lib.mtmd_tokenize(self.ptr, chunks_ptr, text, ptrs, len(bitmaps))
        if rc != 0:
            chunks.close()
            if rc == 1:
                fail(InvalidInputError, "mtmd_tokenize: markers and bitmaps do not match")
            fail(MediaError, f"mtmd_tokenize failed (code {rc})")
        return chunks

    def _check_kind(self, is_audio: bool, what: str) -> None:
        if is_audio and not self.supports_audio:
            raise MediaError(f"{what} is audio, but the projector {os.path.basename(self.path)} takes no audio input")
        if not is_audio and not self.supports_vision:
            raise MediaError(f"{what} is an image, but the projector {os.path.basename(self.path)} takes no image input")

    def __repr__(self) -> str:
        if self.closed:
            return "<MtmdContext closed>"
        kinds = [k for k, on in (("vision", self.supports_vision), ("audio", self.supports_audio)) if on]
        return f"<MtmdContext {os.path.basename(self.path)} {'+'.join(kinds)}>"


# -- bitmaps ----------------------------------------------------------------------------------

_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"ID3")


def _looks_like_audio(data: bytes) -> bool:
    """The checks mtmd-helper uses to route a buffer to the audio decoder (wav, flac, mp3)."""
    if len(data) < 12:
        return False
    return ((data[:4] == b"RIFF" and data[8:12] == b"WAVE") or data[:4] == b"fLaC" or data[:3] == b"ID3"
            or (data[0] == 0xFF and (data[1] & 0xE0) == 0xE0))


class Bitmap(Handle):
    """One image (RGB, uint8) or audio clip (mono float32 PCM) for libmtmd, with an optional id.

    The id is used by libmtmd (and your KV-cache bookkeeping) to recognise the same media;
    bitmaps decoded from bytes or files get the SHA-256 of the bytes unless one is given.
    """

    def __init__(self, ptr, extra_free=None, what: str = "bitmap") -> None:
        if ptr == ffi.NULL:
            raise MtmdError(f"could not create {what}")
        if extra_free is None:
            super().__init__(ptr, lib.mtmd_bitmap_free)
        else:
            def free(p, _extra=extra_free):
                lib.mtmd_bitmap_free(p)
                _extra()
            super().__init__(ptr, free)
        self._keep_mctx: Any = None  # a lazy (video) bitmap reads through its projector context

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_array(cls, image: np.ndarray, id: str | None = None) -> "Bitmap":
        """An image from a C-contiguous uint8 numpy array of shape (H, W, 3), RGB."""
        if not isinstance(image, np.ndarray):
            raise InvalidInputError(f"image must be a numpy array, not {type(image).__name__}")
        if image.dtype != np.uint8:
            raise InvalidInputError(f"image must have dtype uint8, not {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(f"image must have shape (H, W, 3) (RGB), not {image.shape}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            raise InvalidInputError(f"image is empty (shape {image.shape})")
        if h >= 2**31 or w >= 2**31:
            raise InvalidInputError(f"image is too large (shape {image.shape})")
        if not image.flags.c_contiguous:
            raise InvalidInputError("image must be C-contiguous (use np.ascontiguousarray)")
        ptr = lib.mtmd_bitmap_init(w, h, ffi.from_buffer("unsigned char[]", image))
        bm = cls(ptr, what="image bitmap")
        bm.set_id(id)
        return bm

    @classmethod
    def from_audio(cls, pcm: np.ndarray, id: str | None = None) -> "Bitmap":
        """An audio clip from a C-contiguous 1-D float32 numpy array of mono PCM samples.

        The samples must be at the projector's sample rate (``MtmdContext.audio_sample_rate``).
        """
        if not isinstance(pcm, np.ndarray):
            raise InvalidInputError(f"audio must be a numpy array, not {type(pcm).__name__}")
        if pcm.dtype != np.float32:
            raise InvalidInputError(f"audio must have dtype float32, not {pcm.dtype}")
        if pcm.ndim != 1:
            raise InvalidInputError(f"audio must be one-dimensional (mono samples), not shape {pcm.shape}")
        if pcm.size < 2:
            raise InvalidInputError(f"audio needs at least 2 samples, not {pcm.size}")
        if not pcm.flags.c_contiguous:
            raise InvalidInputError("audio must be C-contiguous (use np.ascontiguousarray)")
        if not np.isfinite(pcm).all():
            raise InvalidInputError("audio holds NaN or infinite samples")
        ptr = lib.mtmd_bitmap_init_from_audio(pcm.size, ffi.from_buffer("float[]", pcm))
        bm = cls(ptr, what="audio bitmap")
        bm.set_id(id)
        return bm

    @classmethod
    def from_bytes(cls, mctx: MtmdContext, data: bytes | bytearray | memoryview, id: str | None = None) -> "Bitmap":
        """Decode an encoded image (jpg, png, bmp, gif, ... as stb_image reads them) or audio
        (wav, mp3, flac; resampled to the projector's rate) the way mtmd-helper does."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise InvalidInputError("media data is empty")
        is_audio = _looks_like_audio(data)
        mctx._check_kind(is_audio, "the media data")
        buf = ffi.from_buffer("unsigned char[]", data)
        clear_errors()
        res = lib.mtmd_helper_bitmap_init_from_buf(mctx.ptr, buf, len(data), False, lib.mtmd_helper_init_opt_default())
        video = res.video_ctx
        if res.bitmap == ffi.NULL:
            if video != ffi.NULL:
                lib.mtmd_helper_video_free(video)
            what = "audio" if is_audio else "an image"
            fail(MediaError, f"could not decode the media data as {what} (corrupt or unsupported format)")
        extra = None if video == ffi.NULL else (lambda v=video: lib.mtmd_helper_video_free(v))
        bm = cls(res.bitmap, extra)
        if video != ffi.NULL:
            bm._keep_mctx = mctx  # the lazy (video) bitmap reads through the projector's context
        if id is not None:
            bm.set_id(id)
        return bm

    @classmethod
    def from_file(cls, mctx: MtmdContext, path: str | os.PathLike, id: str | None = None) -> "Bitmap":
        """Read and decode a media file (see ``from_bytes``)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"media file not found: {path}")
        if not os.path.isfile(path):
            raise InvalidInputError(f"media path is not a regular file: {path}")
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise InvalidInputError(f"media file is empty: {path}")
        try:
            return cls.from_bytes(mctx, data, id=id)
        except MediaError as e:
            raise MediaError(f"{path}: {e}") from None

    @classmethod
    def load(cls, mctx: MtmdContext, media: Media, id: str | None = None) -> "Bitmap":
        """Any supported form: a Bitmap (returned as is), a path, bytes, or a numpy image/audio array."""
        if isinstance(media, Bitmap):
            return media
        if isinstance(media, np.ndarray):
            if media.dtype == np.float32 and media.ndim == 1:
                return cls.from_audio(media, id=id)
            return cls.from_array(media, id=id)
        if isinstance(media, (bytes, bytearray, memoryview)):
            return cls.from_bytes(mctx, media, id=id)
        if isinstance(media, (str, os.PathLike)):
            return cls.from_file(mctx, media, id=id)
        raise InvalidInputError(f"cannot make a bitmap from {type(media).__name__}")

    # -- facts ------------------------------------------------------------------------------------
    nx = property(lambda self: int(lib.mtmd_bitmap_get_nx(self.ptr)), doc="width (audio: number of samples)")
    ny = property(lambda self: int(lib.mtmd_bitmap_get_ny(self.ptr)), doc="height (audio: 1)")
    n_bytes = property(lambda self: int(lib.mtmd_bitmap_get_n_bytes(self.ptr)))
    is_audio = property(lambda self: bool(lib.mtmd_bitmap_is_audio(self.ptr)))

    @property
    def id(self) -> str | None:
        """The id, or None when unset."""
        s = _str_or_none(lib.mtmd_bitmap_get_id(self.ptr))
        return s or None

    def set_id(self, id: str | None) -> None:
        if id is None:
            lib.mtmd_bitmap_set_id(self.ptr, ffi.NULL)
            return
        if not isinstance(id, str) or "\0" in id:
            raise InvalidInputError("bitmap id must be a str without NUL")
        lib.mtmd_bitmap_set_id(self.ptr, id.encode("utf-8"))

    def to_numpy(self) -> np.ndarray:
        """A copy of the data: uint8 (H, W, 3) for an image, float32 (n,) for audio."""
        ptr = self.ptr
        n = lib.mtmd_bitmap_get_n_bytes(ptr)
        data = lib.mtmd_bitmap_get_data(ptr)
        if data == ffi.NULL or n == 0:
            raise InvalidInputError("this bitmap holds no data (placeholder or lazy bitmap)")
        raw = bytes(ffi.buffer(data, n))
        if self.is_audio:
            return np.frombuffer(raw, dtype=np.float32).copy()
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.ny, self.nx, 3).copy()

    def __repr__(self) -> str:
        if self.closed:
            return "<Bitmap closed>"
        if self.is_audio:
            return f"<Bitmap audio {self.nx} samples id={self.id!r}>"
        return f"<Bitmap image {self.nx}x{self.ny} id={self.id!r}>"


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


# -- evaluation -------------------------------------------------------------------------------

def _check_eval(ctx: Context, chunks: Chunks, n_past: int, seq_id: int, n_batch: int) -> None:
    mctx = chunks.mctx
    if mctx.closed:
        raise InvalidInputError("the MtmdContext of these chunks is closed")
    if mctx.model is not ctx.model:
        raise InvalidInputError("the chunks were made by an MtmdContext of another model")
    ctx.memory._check_seq(seq_id)
    if n_past < 0:
        raise InvalidInputError(f"n_past must be >= 0, not {n_past}")
    if not 1 <= n_batch <= ctx.n_batch:
        raise InvalidInputError(f"n_batch must be in [1, {ctx.n_batch}] (the context's n_batch), not {n_batch}")
    if n_past + chunks.n_pos > ctx.n_ctx_seq:
        raise ContextOverflowError(f"the chunks take {chunks.n_pos} positions from n_past={n_past}; the context "
                                   f"holds {ctx.n_ctx_seq} per sequence (raise n_ctx or shorten the input)")
    for i, c in enumerate(chunks):
        if c.type == ChunkType.TEXT or not mctx.uses_non_causal(c):
            continue
        # llama.cpp aborts (GGML_ASSERT) on non-causal batches larger than n_ubatch.
        n = c.n_tokens
        if n > ctx.n_ubatch or n > n_batch:
            raise InvalidInputError(
                f"chunk {i} ({c.type.name.lower()}, {n} tokens) is decoded with non-causal attention and must fit "
                f"in one batch: it needs n_ubatch and n_batch >= {n} (context n_ubatch={ctx.n_ubatch}, "
                f"n_batch={n_batch}); raise them or lower image_max_tokens")


def eval_chunks(ctx: Context, chunks: Chunks, n_past: int = 0, seq_id: int = 0, n_batch: int | None = None,
                logits_last: bool = True, *, cancel: Cancel | None = None) -> int:
    """Encode the media and decode all ``chunks`` into sequence ``seq_id`` from position ``n_past``.

    Positions from ``n_past`` on are removed from the sequence first. Returns the new
    ``n_past``; with ``logits_last`` the last position has logits, so
    ``llamabind.generate_after(ctx, new_n_past)`` continues from there. ``n_batch`` (default:
    the context's) bounds each decode. ``cancel`` (or ``ctx.abort()``) stops it between graph
    nodes: AbortedError, and the sequence is left as it was up to ``n_past``. The GIL is
    released while libmtmd and llama.cpp work.
    """
    n_batch = ctx.n_batch if n_batch is None else int(n_batch)
    _check_eval(ctx, chunks, n_past, seq_id, n_batch)
    with ctx.lease():  # a generation running on this context is refused (BusyError)
        return _eval(ctx, chunks, n_past, seq_id, n_batch, logits_last, cancel)


def _eval(ctx: Context, chunks: Chunks, n_past: int, seq_id: int, n_batch: int, logits_last: bool,
          cancel: Cancel | None) -> int:
    """eval_chunks' work, for a caller that holds the context (checked, acquired)."""
    mctx = chunks.mctx
    new_n_past = ffi.new("llama_pos *", n_past)
    ctx.memory.seq_rm(seq_id, n_past, -1)
    clear_errors()
    with ctx.hold(), mctx._lock:
        cptr = ctx.ptr
        ctx.abort_flag_clear()
        if cancel is not None:
            ctx.use_abort_flag(cancel.flag)
        try:
            rc = lib.mtmd_helper_eval_chunks(mctx.ptr, cptr, chunks.ptr, n_past, seq_id, n_batch,
                                             bool(logits_last), new_n_past)
        finally:
            if cancel is not None:
                ctx.restore_abort()
    if rc != 0:
        why = reason("")
        ctx.memory.seq_rm(seq_id, n_past, -1)  # drop whatever the failed evaluation wrote
        if "failed to encode" in why:
            raise MtmdError(f"libmtmd could not encode the media: {why}")
        check_decode(rc, "mtmd_helper_eval_chunks", why)
    ctx.set_outputs(1 if logits_last else 0)
    return int(new_n_past[0])


# -- chat -------------------------------------------------------------------------------------

_MEDIA_KEYS = {"image": ("image", "image_url"), "audio": ("audio", "input_audio")}


def _media_of(part: Mapping[str, Any], kind: str, where: str) -> Any:
    for key in _MEDIA_KEYS[kind]:
        if key in part:
            value = part[key]
            if isinstance(value, Mapping):  # {"url": ...} / {"data": ...} / {"path": ...}
                for sub in ("url", "path", "data"):
                    if sub in value:
                        value = value[sub]
                        break
            if isinstance(value, str) and value.startswith("file://"):
                value = value[len("file://"):]
            return value
    raise InvalidInputError(f"{where}: a {kind} part needs a {kind!r} key (a path, bytes, an array or a Bitmap)")


def render_chat(mctx: MtmdContext, messages: Sequence[Mapping[str, Any]], *, template: str | None = None,
                add_generation_prompt: bool = True) -> tuple[str, list[Media]]:
    """Render chat messages whose content may hold image/audio parts with the model's chat template.

    ``content`` is a str, or a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image", "image": MEDIA}``, ``{"type": "audio", "audio": MEDIA}`` where MEDIA is a
    path, encoded bytes, a numpy array or a Bitmap. Each media part becomes the media marker in
    the message text, in place. Returns the prompt and the media, in marker order.
    """
    flat: list[dict[str, str]] = []
    media: list[Media] = []
    marker = mctx.marker
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidInputError(f"message {i} needs 'role' and 'content'")
        content = m["content"]
        if isinstance(content, str):
            n = content.count(marker)
            if n:
                raise InvalidInputError(f"message {i}: text holds the media marker {marker!r}; "
                                        "give media as image/audio parts")
            text = content
        elif isinstance(content, Sequence):
            pieces = []
            for j, part in enumerate(content):
                where = f"message {i} part {j}"
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, Mapping) or "type" not in part:
                    raise InvalidInputError(f"{where}: a part is a dict with a 'type'")
                kind = part["type"]
                if kind == "text":
                    t = part.get("text")
                    if not isinstance(t, str):
                        raise InvalidInputError(f"{where}: a text part needs a str 'text'")
                    if marker in t:
                        raise InvalidInputError(f"{where}: text holds the media marker {marker!r}")
                    pieces.append(t)
                elif kind in ("image", "image_url"):
                    media.append(_media_of(part, "image", where))
                    pieces.append(marker)
                elif kind in ("audio", "input_audio"):
                    media.append(_media_of(part, "audio", where))
                    pieces.append(marker)
                else:
                    raise InvalidInputError(f"{where}: unknown part type {kind!r} (text, image, audio)")
            text = "".join(pieces)
        else:
            raise InvalidInputError(f"message {i}: content must be a str or a list of parts")
        flat.append({"role": m["role"], "content": text})
    prompt = mctx.model.apply_chat_template(flat, add_generation_prompt, template)
    return prompt, media


# -- generation -------------------------------------------------------------------------------

def _bos_in_text(ctx: Context, text: str) -> bool:
    bos = ctx.vocab.bos
    return bos is not None and text.startswith(ctx.vocab.text(bos))


def _prepare(ctx: Context, mctx: MtmdContext, prompt: str | None, bitmaps: Sequence[Media],
             messages, template, add_special: bool, parse_special: bool) -> tuple[Chunks, str]:
    if mctx.model is not ctx.model:
        raise InvalidInputError("the MtmdContext and the Context belong to different models")
    if messages is not None:
        if prompt is not None or bitmaps:
            raise InvalidInputError("give a prompt (with bitmaps) or messages, not both")
        prompt, media = render_chat(mctx, messages, template=template)
        add_special = add_special and not _bos_in_text(ctx, prompt)
        parse_special = True
    elif prompt is None:
        raise InvalidInputError("a prompt or messages is required")
    else:
        media = list(bitmaps)
    made: list[Bitmap] = []  # made here from a path/bytes/array: closed once the chunks hold a copy
    try:
        loaded = []
        for m in media:
            b = Bitmap.load(mctx, m)
            if b is not m:
                made.append(b)
            loaded.append(b)
        chunks = mctx.tokenize(prompt, loaded, add_special=add_special, parse_special=parse_special)
    finally:
        for b in made:
            b.close()
    return chunks, prompt


def generate(ctx: Context, mctx: MtmdContext, prompt: str | None = None, bitmaps: Sequence[Media] = (), *,
             messages: Sequence[Mapping[str, Any]] | None = None, max_tokens: int = 256,
             sampler: Sampler | None = None, stop: Iterable[str] = (), seq_id: int = 0,
             cancel: Cancel | None = None, n_batch: int | None = None, template: str | None = None,
             add_special: bool = True, parse_special: bool = True) -> Iterator[TokenEvent | DoneEvent]:
    """Stream the continuation of a prompt with media: tokenize, evaluate, then the usual decode loop.

    ``prompt`` holds one media marker (``mctx.marker``) per entry of ``bitmaps`` (Bitmaps, paths,
    encoded bytes or numpy arrays); or ``messages`` are chat messages with image/audio parts
    (see ``render_chat``), rendered with the model's chat template. The sequence is cleared
    first. Events are those of ``llamabind.generate``; ``usage.prompt_tokens`` counts the
    media embeddings, and the timings include the media encoding. Input errors are raised
    here, before anything runs; the evaluation starts with the first ``next()``.
    """
    chunks, _ = _prepare(ctx, mctx, prompt, bitmaps, messages, template, add_special, parse_special)
    try:
        n_batch = ctx.n_batch if n_batch is None else int(n_batch)
        if chunks.n_tokens == 0:
            raise InvalidInputError("empty prompt: nothing to decode")
        if chunks.n_pos >= ctx.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt takes {chunks.n_pos} positions; the context holds {ctx.n_ctx_seq} per sequence "
                f"(leave room to generate: raise n_ctx or shorten the prompt)")
        if max_tokens < 1:
            raise InvalidInputError("max_tokens must be >= 1")
        _check_eval(ctx, chunks, 0, seq_id, n_batch)
    except BaseException:
        chunks.close()
        raise
    return _generate(ctx, chunks, seq_id=seq_id, n_batch=n_batch, max_tokens=max_tokens,
                     sampler=sampler, stop=stop, cancel=cancel)


def _generate(ctx: Context, chunks: Chunks, *, seq_id: int, n_batch: int, max_tokens: int,
              sampler: Sampler | None, stop: Iterable[str], cancel: Cancel | None) -> Iterator:
    n_prompt = chunks.n_tokens
    t_eval = 0.0

    def prefill() -> int:
        """Evaluate the chunks inside the generation's hold on the context."""
        nonlocal t_eval
        t0 = time.perf_counter()
        try:
            if cancel is not None and cancel.is_set():
                raise AbortedError("cancelled before the prompt was evaluated", 2)
            return _eval(ctx, chunks, 0, seq_id, n_batch, True, None)  # the loop installed ``cancel``
        finally:
            t_eval = time.perf_counter() - t0
            chunks.close()

    try:
        events = generate_after(ctx, prefill=prefill, n_prompt=n_prompt, seq_id=seq_id, max_tokens=max_tokens,
                                sampler=sampler, stop=stop, cancel=cancel)
    except BaseException:
        chunks.close()
        raise
    for ev in events:
        if isinstance(ev, DoneEvent):
            t = ev.timings
            # llama.cpp's prompt counters do not see the media encoder: rate the whole evaluation
            ev.timings = Timings(ttft_s=t.ttft_s, prompt_tps=n_prompt / t_eval if t_eval > 0 else 0.0,
                                 generation_tps=t.generation_tps, prompt_ms=1e3 * t_eval,
                                 generation_ms=t.generation_ms)
        yield ev


def complete(ctx: Context, mctx: MtmdContext, prompt: str | None = None, bitmaps: Sequence[Media] = (),
             **kwargs) -> DoneEvent:
    """Run ``generate`` to the end and return its DoneEvent (``.text`` holds the whole text)."""
    done = None
    for ev in generate(ctx, mctx, prompt, bitmaps, **kwargs):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None
    return done
