"""llamabind: fast, safe, compiler-checked Python bindings to llama.cpp.

Layers, lowest first: ``llamabind.ffi``/``llamabind.lib`` (the raw C surface, unsafe),
one class per C handle (Model, Vocab, Context, Batch, Sampler, ...), then the decode
loop, embeddings and multimodal helpers.
"""

from .binding import ffi, lib
from .errors import (
    AbortedError,
    BusyError,
    ClosedError,
    ContextOverflowError,
    DecodeError,
    InvalidInputError,
    KVCacheFullError,
    LlamaError,
    ModelLoadError,
    ModelNotFoundError,
    MtmdError,
)
from .system import __version__, system_info

__all__ = [
    "ffi", "lib", "__version__", "system_info",
    "AbortedError", "BusyError", "ClosedError", "ContextOverflowError", "DecodeError",
    "InvalidInputError", "KVCacheFullError", "LlamaError", "ModelLoadError",
    "ModelNotFoundError", "MtmdError",
]
