"""The base of every owning handle: freed exactly once, children before parents."""

from __future__ import annotations

import weakref
from typing import Any, Callable

from .raw import ffi
from .errors import ClosedError


class Handle:
    """Owns one C pointer and the function that frees it.

    ``close()`` frees it now (children first); a finalizer frees it at garbage collection
    or interpreter exit otherwise. Finalizers at exit run newest first, so children
    (always created after their parents) go before them. A parent keeps a weak set of its
    children and closes them before itself.
    """

    __slots__ = ("_ptr", "_finalizer", "_children", "__weakref__")

    def __init__(self, ptr: Any, free: Callable[[Any], None] | None, parent: "Handle | None" = None) -> None:
        self._ptr = ptr
        self._children: weakref.WeakSet[Handle] = weakref.WeakSet()
        self._finalizer = weakref.finalize(self, free, ptr) if free is not None else None
        if parent is not None:
            parent._children.add(self)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def ptr(self) -> Any:
        """The raw C pointer, for use with ``llamabind.lib``; raises if closed."""
        if self._ptr is None:
            raise ClosedError(f"{type(self).__name__} is closed")
        return self._ptr

    def adopt(self, child: "Handle") -> None:
        """Make ``child`` (made elsewhere, e.g. a sampler chain over this model's vocab) close before this."""
        self._children.add(child)

    def _detach(self) -> None:
        """Forget the pointer without freeing it (ownership moved elsewhere, e.g. into a chain)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._ptr = None

    def close(self) -> None:
        """Free the C object now (children first); further use raises ClosedError. Idempotent."""
        if self._ptr is None:
            return
        for child in list(self._children):
            child.close()
        self._ptr = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else hex(int(ffi.cast("uintptr_t", self._ptr)))
        return f"<{type(self).__name__} {state}>"
