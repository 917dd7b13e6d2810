"""Bitmaps (``mtmd_bitmap``): images and audio from files, bytes or arrays, checked before libmtmd."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .._handle import Handle
from ..errors import (
    InvalidInputError,
    MtmdError,
)
from ..raw import clear_errors, fail, ffi, lib
from .types import Media, MediaError, _str_or_none

if TYPE_CHECKING:
    from .context import MtmdContext


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
