"""The one place where llama.cpp's failures become llamabind exceptions: return codes and the
error lines llama.cpp logged on this thread (collected by the log bridge)."""

from __future__ import annotations

from typing import NoReturn

from ..errors import AbortedError, DecodeError, KVCacheFullError, LlamaError
from ._binding import ffi, lib, take_errors

SEE_LOG = "see the llamabind log"


def clear_errors() -> None:
    """Forget error lines logged so far on this thread (before a call whose failure is reported)."""
    take_errors()


def reason(default: str = SEE_LOG) -> str:
    """What llama.cpp logged as the reason of the failure that just happened (``default`` if nothing)."""
    return take_errors() or default


def fail(error: type[LlamaError], what: str, default: str = SEE_LOG) -> NoReturn:
    """Raise ``error("what: <llama.cpp's logged reason>")``."""
    raise error(f"{what}: {reason(default)}")


def take_text(ptr, err, what: str, error: type[LlamaError]) -> str:
    """The text a shim call returned (a malloc'd string, freed here), or ``error("what: <err>")``
    when it returned NULL with its reason in the ``err`` buffer."""
    if ptr == ffi.NULL:
        raise error(f"{what}: {ffi.string(err).decode('utf-8', 'replace') or SEE_LOG}")
    try:
        return ffi.string(ptr).decode("utf-8", "replace")
    finally:
        lib.llamabind_chat_string_free(ptr)


def check_decode(rc: int, what: str = "llama_decode", detail: str | None = None) -> None:
    """Turn a llama_decode/llama_encode (or libmtmd eval) return code into an exception (0: success);
    ``detail``: the logged reason when the caller already took it."""
    if rc == 0:
        return
    detail = take_errors() if detail is None else detail
    why = f": {detail}" if detail else f" ({SEE_LOG})"
    if rc == 1:
        raise KVCacheFullError(f"{what}: no KV-cache slot for the batch (context full){why}", rc)
    if rc == 2:
        raise AbortedError(f"{what}: aborted", rc)
    if rc == -1:
        raise DecodeError(f"{what}: invalid batch{why}", rc)
    raise DecodeError(f"{what}: failed with code {rc}{why}", rc)
