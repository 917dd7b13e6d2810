"""The exceptions llamabind raises; every failure of llama.cpp becomes one of these.

    LlamaError
    ├── ClosedError            a handle used after close() (also a ValueError, like closed files)
    ├── ModelLoadError         a model or adapter file that cannot be loaded
    │   └── ModelNotFoundError     the path does not exist (also a FileNotFoundError)
    ├── InvalidInputError      bad tokens, text, grammar, batch, image ... (also a ValueError)
    │   ├── InputNotFoundError     an input file (state, media) does not exist (also a FileNotFoundError)
    │   └── ContextOverflowError   more tokens than the context (or sequence) holds
    ├── DecodeError            llama_decode/llama_encode failed (``code`` holds the return value)
    │   ├── KVCacheFullError       no room in the KV cache for the batch (code 1)
    │   └── AbortedError           stopped by the abort callback (code 2)
    ├── BusyError              a context already driven by another generation or thread
    ├── RpcServerLostError     an RPC server a model is loaded on died (also a ConnectionError)
    └── MtmdError              libmtmd failed (tokenize, encode, load a projector)
"""

from __future__ import annotations


class LlamaError(Exception):
    """Base class of every llamabind error."""


class ClosedError(LlamaError, ValueError):
    """A handle (model, context, sampler, ...) was used after it was closed."""


class ModelLoadError(LlamaError):
    """A model, adapter or projector file could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist."""


class InvalidInputError(LlamaError, ValueError):
    """Input that llama.cpp would reject or crash on: checked before calling it."""


class InputNotFoundError(InvalidInputError, FileNotFoundError):
    """A file given as input (a state file, an image) does not exist."""


class ContextOverflowError(InvalidInputError):
    """The tokens do not fit in the context (or the sequence's share of it)."""


class DecodeError(LlamaError):
    """llama_decode or llama_encode returned an error code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class KVCacheFullError(DecodeError):
    """No KV-cache slot could hold the batch (llama_decode returned 1)."""


class AbortedError(DecodeError):
    """The computation was stopped by the abort callback (llama_decode returned 2)."""


class BusyError(LlamaError):
    """The context is already being driven by another generation."""


class RpcServerLostError(LlamaError, ConnectionError):
    """An RPC server that holds part of a model stopped answering: the model (and its contexts)
    can no longer compute; close them and load the model again. ``endpoints`` names the servers."""

    def __init__(self, message: str, endpoints: list[str]) -> None:
        super().__init__(message)
        self.endpoints = endpoints


class MtmdError(LlamaError):
    """libmtmd reported a failure."""
