"""The raw C surface: ``ffi`` and ``lib`` over llama.h, mtmd.h and mtmd-helper.h.

Everything exported by libllama, ggml and libmtmd is reachable as ``lib.<name>``; structs
and enums are known to ``ffi``. Nothing here is safe: the objects in the other modules are.
Importing this module routes llama.cpp's, ggml's and libmtmd's log output to the Python
logger ``llamabind`` and initialises the ggml backends once.
"""

from __future__ import annotations

import logging
import os
import threading

from .. import _llamabind
from .._llamabind import ffi, lib

__all__ = ["ffi", "lib", "logger"]

logger = logging.getLogger("llamabind")
# A library prints nothing until the application configures logging (no last-resort output).
logger.addHandler(logging.NullHandler())

# ggml_log_level -> logging level; GGML_LOG_LEVEL_CONT continues the previous message.
_LEVELS = {
    lib.GGML_LOG_LEVEL_NONE: logging.INFO,
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


class _LogState(threading.local):
    """Per-thread partial line, so pieces of one message from one thread stay together."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.buffer = ""
        self.errors: list[str] = []


_log_state = _LogState()


@ffi.def_extern()
def _llamabind_log(level: int, text, user_data) -> None:
    state = _log_state
    if level != lib.GGML_LOG_LEVEL_CONT:
        state.level = _LEVELS.get(level, logging.INFO)
    state.buffer += ffi.string(text).decode("utf-8", "replace")
    if "\n" not in state.buffer:
        return
    *lines, state.buffer = state.buffer.split("\n")
    if state.level >= logging.ERROR:
        state.errors.extend(line.strip() for line in lines if line.strip())
        del state.errors[:-8]
    if logger.isEnabledFor(state.level):
        for line in lines:
            if line.strip():
                logger.log(state.level, "%s", line)


def take_errors() -> str:
    """The error lines llama.cpp logged on this thread since the last call, joined ("" if none)."""
    errors, _log_state.errors = _log_state.errors, []
    return "; ".join(errors)


def _init() -> None:
    lib.llama_log_set(lib._llamabind_log, ffi.NULL)
    lib.mtmd_helper_log_set(lib._llamabind_log, ffi.NULL)
    from .. import _build_info

    if _build_info.BACKEND_DL:
        # Backends are separate modules next to this file; ggml picks the best CPU variant.
        lib.ggml_backend_load_all_from_path(os.path.dirname(os.path.abspath(_llamabind.__file__)).encode())
    lib.llama_backend_init()


_init()
