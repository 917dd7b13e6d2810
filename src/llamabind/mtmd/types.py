"""What the multimodal floor shares: MediaError, chunk types, the media a call may take."""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, Union

import numpy as np

from ..errors import (
    InvalidInputError,
    MtmdError,
)
from ..raw import ffi, lib

if TYPE_CHECKING:
    from .bitmap import Bitmap

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
