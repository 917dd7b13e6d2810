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
    InputNotFoundError,
    InvalidInputError,
    KVCacheFullError,
    LlamaError,
    ModelLoadError,
    ModelNotFoundError,
    MtmdError,
)
from .system import __version__, system_info
from .model import LoraAdapter, Model
from .vocab import Detokenizer, Vocab
from .batch import Batch
from .context import Context, PerfData
from .memory import CachedTokens, Memory
from .sampler import PySampler, Sampler, TokenDataArray
from .embeddings import Embedder, Reranker, RerankResult
from .generate import (
    Cancel,
    DoneEvent,
    TokenEvent,
    Timings,
    Usage,
    complete,
    generate,
    generate_after,
    generate_many,
)

__all__ = [
    "ffi", "lib", "__version__", "system_info",
    "Model", "LoraAdapter", "Vocab", "Detokenizer", "Batch", "Context", "Memory", "CachedTokens", "PerfData",
    "Sampler", "PySampler", "TokenDataArray", "Embedder", "Reranker", "RerankResult",
    "Cancel", "DoneEvent", "TokenEvent", "Timings", "Usage", "complete", "generate", "generate_after", "generate_many",
    "AbortedError", "BusyError", "ClosedError", "ContextOverflowError", "DecodeError",
    "InputNotFoundError", "InvalidInputError", "KVCacheFullError", "LlamaError", "ModelLoadError",
    "ModelNotFoundError", "MtmdError",
]
