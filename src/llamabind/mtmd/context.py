"""The projector context (``mtmd_context``): loads an mmproj GGUF for a model, tokenizes prompts with media."""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from .. import _params
from .._handle import Handle
from ..errors import (
    InvalidInputError,
    ModelNotFoundError,
    MtmdError,
)
from ..gguf_check import check_gguf
from ..model import Model, _Progress, check_sha256, load_failed
from ..raw import clear_errors, fail, ffi, lib
from .bitmap import Bitmap
from .chunks import Chunk, Chunks
from .types import Media, MediaError

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
    MtmdError; a missing file raises ModelNotFoundError, and one whose SHA-256 is not the
    expected ``sha256`` raises ModelLoadError, as ``Model`` does, before libmtmd reads it.
    """

    def __init__(self, model: Model, mmproj: str | os.PathLike, *, use_gpu: bool = True,
                 n_threads: int | None = None, media_marker: str | None = None,
                 print_timings: bool = False, warmup: bool = True, flash_attn: bool | str | None = None,
                 image_min_tokens: int | None = None, image_max_tokens: int | None = None,
                 batch_max_tokens: int | None = None, progress=None, check: bool = True,
                 sha256: str | None = None, **params: Any) -> None:
        path = os.fspath(mmproj)
        if not os.path.exists(path):
            raise ModelNotFoundError(f"projector file not found: {path}")
        if not os.path.isfile(path):
            raise MtmdError(f"projector is not a regular file: {path}")
        if n_threads is not None and n_threads < 1:
            raise InvalidInputError(f"n_threads must be >= 1, not {n_threads}")
        check_sha256(path, sha256)
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
            load_failed(state, MtmdError, path, f"libmtmd could not load the projector {path}")
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
