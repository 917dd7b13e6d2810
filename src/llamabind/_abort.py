"""Stopping a running decode: llama.cpp's abort callback reads the context's one flag (set by
``abort()`` and ``close()``) and a ``Cancel``'s while a generation runs, in C; a Python callable
(``set_abort_callback``) is asked only when neither is set. Context inherits this."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .raw import ffi, lib


class AbortHook:
    """A Python abort callback, called by llama.cpp between graph nodes; True aborts.

    An exception it raises aborts the decode and is raised to the caller of decode.
    """

    __slots__ = ("fn", "error", "flags")

    def __init__(self, fn: Callable[[], bool], flags: Any) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self.flags = flags  # the context's flag and a Cancel's (``int *[2]``)


@ffi.def_extern()
def _llamabind_abort(data) -> bool:
    hook: AbortHook = ffi.from_handle(data)
    if lib._llamabind_flag_abort(hook.flags):
        return True
    try:
        return bool(hook.fn())
    except BaseException as e:
        hook.error = e
        return True


class Aborts:
    """The abort side of a context: ``abort()`` from any thread, a Cancel's flag, a Python callback."""

    if TYPE_CHECKING:
        ptr: Any
        _abort_flag: Any
        _abort_flags: Any
        _abort_hook: AbortHook | None
        _abort_handle: Any

        def hold(self) -> Any: ...

    def set_abort_callback(self, fn: Callable[[], bool] | None) -> None:
        """Call ``fn()`` during computation; True aborts the decode (AbortedError), and an exception
        it raises is raised from the decode. None restores the default (``abort()``)."""
        with self.hold():
            self._abort_hook = None if fn is None else AbortHook(fn, self._abort_flags)
            self._abort_handle = None if fn is None else ffi.new_handle(self._abort_hook)
            if fn is not None:
                lib.llama_set_abort_callback(self.ptr, lib._llamabind_abort, self._abort_handle)
            else:
                lib.llama_set_abort_callback(self.ptr, ffi.addressof(lib, "_llamabind_flag_abort"),
                                             self._abort_flags)

    def restore_abort(self) -> None:
        """Stop reading the flag given to ``use_abort_flag``."""
        self._abort_flags[1] = ffi.NULL

    def use_abort_flag(self, flag: Any) -> None:
        """Also abort decodes when the C int ``flag`` (a ``Cancel``'s) becomes non-zero, until
        ``restore_abort``; ``abort()`` and ``close()`` still abort meanwhile."""
        self._abort_flags[1] = flag

    def abort(self) -> None:
        """Stop the decode running now (from any thread); the next decode runs normally."""
        self._abort_flag[0] = 1

    def abort_flag_clear(self) -> None:
        """Clear ``abort()``'s flag before a decode made outside ``decode`` (libmtmd)."""
        self._abort_flag[0] = 0
