"""Who drives a context: a generation's lease for its duration, or an engine's claim across many
steps. Decodes from any other thread get BusyError meanwhile (Context inherits this)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from .errors import BusyError


class Leases:
    """``Context.lease()``, ``claim``/``release`` and the owner check made by every decode."""

    if TYPE_CHECKING:
        _lock: Any
        _lease: int | None
        _lease_owner: object
        ptr: Any

    @contextmanager
    def lease(self) -> Iterator[Any]:
        """Take the context for one generation; BusyError while another one has it."""
        with self._lock:
            self.ptr
            if self._lease is not None:
                raise BusyError("this context is already running a generation")
            self._lease = threading.get_ident()
        try:
            yield self
        finally:
            self._lease = None

    def claim(self, owner: object) -> None:
        """Lease the context to ``owner`` (an engine) for the calling thread until ``release``:
        generations and decodes from elsewhere get BusyError meanwhile. The same owner may claim
        it again from another thread; re-claiming from the same thread costs one comparison."""
        me = threading.get_ident()
        if self._lease == me and self._lease_owner is owner:
            return
        with self._lock:
            self.ptr
            if self._lease is not None and (self._lease_owner is None or self._lease_owner is not owner):
                raise BusyError("this context is already running a generation")
            self._lease, self._lease_owner = me, owner

    def release(self, owner: object) -> None:
        """End ``owner``'s claim (nothing if it holds none)."""
        with self._lock:
            if self._lease_owner is owner:
                self._lease, self._lease_owner = None, None

    def _check_owner(self) -> None:
        if self._lease is not None and self._lease != threading.get_ident():
            raise BusyError("a generation in another thread is driving this context")

