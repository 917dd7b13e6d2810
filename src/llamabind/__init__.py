"""llamabind: fast, safe, compiler-checked Python bindings to llama.cpp.

Floors, lowest first: ``llamabind.raw`` (``ffi``/``lib``, the raw C surface, unsafe), one
class per C handle (Model, Vocab, Context, Memory, Batch, Sampler, ...), then the decode loop,
embeddings and multimodal helpers, and the engine (continuous batching) on top.
"""

from . import raw
from .raw import ffi, lib
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
    RpcServerLostError,
)
from .system import __version__, system_info
from .model import LoraAdapter, Model
from .vocab import Detokenizer, Vocab
from .batch import Batch
from .context import Context, PerfData
from .memory import CachedTokens, Memory
from .pysampler import PySampler, TokenDataArray
from .sampler import Sampler
from .embeddings import Embedder, Reranker, RerankResult
from .generation import (
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
from .generation.logprobs import TokenLogprob
from .engine import AsyncEngine, Engine, EngineThread, Request

__all__ = [
    "raw", "ffi", "lib", "__version__", "system_info",
    "Model", "LoraAdapter", "Vocab", "Detokenizer", "Batch", "Context", "Memory", "CachedTokens", "PerfData",
    "Sampler", "PySampler", "TokenDataArray", "Embedder", "Reranker", "RerankResult",
    "Cancel", "DoneEvent", "TokenEvent", "Timings", "Usage", "complete", "generate", "generate_after", "generate_many",
    "TokenLogprob", "Engine", "EngineThread", "AsyncEngine", "Request",
    "AbortedError", "BusyError", "ClosedError", "ContextOverflowError", "DecodeError",
    "InputNotFoundError", "InvalidInputError", "KVCacheFullError", "LlamaError", "ModelLoadError",
    "ModelNotFoundError", "MtmdError", "RpcServerLostError",
]
