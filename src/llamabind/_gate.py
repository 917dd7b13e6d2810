"""Who may touch a handle's C state now: ``Gate`` (one thread at a time, for a context or a
sampler) and ``SharedGate`` (many readers, for a model). Neither ever waits for another user:
a call that would have to wait gets BusyError at once, so no two threads can deadlock on it.
Only ``close`` waits, for the user inside to leave (after aborting its decode).

The thread contract (also in ARCHITECTURE.md):
- a call from a second thread while one is inside gets BusyError;
- a call from inside a callback that llama.cpp runs under the gate (an abort callback, a Python
  sampler) gets BusyError;
- while an owner (an engine, a generation) has claimed the gate, only the owner's own calls get
  in, from whichever thread it runs on (calls made by its code, nested inside it, pass too);
- ``close`` from another thread marks the gate closing (new calls get ClosedError), aborts a
  running decode through the context's flag, waits for the user inside to leave, then frees.
"""

from __future__ import annotations

import threading
from typing import Any

from .errors import BusyError, ClosedError

_ident = threading.get_ident


class Gate:
    """One user at a time, re-entrant for that user's nested calls; ``with gate:`` enters."""

    __slots__ = ("what", "_mutex", "_idle", "_thread", "_depth", "_owner", "in_c", "_closers", "closing")

    def __init__(self, what: str) -> None:
        self.what = what
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._thread: int | None = None  # the thread inside
        self._depth = 0
        self._owner: object = None        # who claimed it, if anyone
        # set by the inside thread around its calls into llama.cpp: a call from it meanwhile is a callback's
        self.in_c = False
        self._closers = 0                 # close() calls waiting for the inside thread to leave
        self.closing = False

    def enter(self, owner: object = None) -> None:
        """Let the calling thread in, or raise BusyError (ClosedError once closing)."""
        me = _ident()
        if self._thread == me:  # nested: while it is inside, only this thread changes the gate's state
            if self.in_c:
                raise BusyError(f"{self.what} was called from inside a callback that llama.cpp runs "
                                f"on it (abort callback or Python sampler): not allowed")
            self._depth += 1
            return
        with self._mutex:
            if self.closing:
                raise ClosedError(f"{self.what} is closed")
            if self._thread is not None:
                raise BusyError(f"{self.what} is in use by another thread")
            if self._owner is not None and owner is not self._owner:
                raise BusyError(f"{self.what} is driven by {_name(self._owner)}: only it may use it now")
            self._thread, self._depth = me, 1

    def exit(self) -> None:
        if self._depth > 1:  # nested: no other thread touches the gate meanwhile
            self._depth -= 1
            return
        with self._mutex:
            self._depth = 0
            self._thread = None
            if self._closers:
                self._idle.notify_all()

    def __enter__(self) -> "Gate":
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()

    def use(self, owner: object) -> "_Use":
        """``with gate.use(owner):`` enters as ``owner`` (the one that claimed it)."""
        return _Use(self, owner)

    def claim(self, owner: object) -> None:
        """Reserve the gate for ``owner`` until ``release``; BusyError if another owner has it or
        another thread is inside."""
        me = _ident()
        with self._mutex:
            if self.closing:
                raise ClosedError(f"{self.what} is closed")
            if self._owner is owner:
                return
            if self._owner is not None:
                raise BusyError(f"{self.what} is already driven by {_name(self._owner)}")
            if self._thread is not None and self._thread != me:
                raise BusyError(f"{self.what} is in use by another thread")
            self._owner = owner

    def release(self, owner: object) -> None:
        """End ``owner``'s claim (nothing if it holds none)."""
        with self._mutex:
            if self._owner is owner:
                self._owner = None

    def shut(self, abort: Any = None) -> None:
        """Mark closing, call ``abort()`` if another thread is inside, and wait for it to leave
        (then the caller may free); BusyError when called from inside a callback."""
        me = _ident()
        with self._mutex:
            if self._thread == me and self.in_c:
                raise BusyError(f"{self.what} cannot be closed from inside a callback it runs")
            self.closing = True
            if self._thread is not None and self._thread != me:
                if abort is not None:
                    abort()
                self._closers += 1
                try:
                    while self._thread is not None:
                        self._idle.wait()
                finally:
                    self._closers -= 1


class _Use:
    __slots__ = ("_gate", "_owner")

    def __init__(self, gate: Gate, owner: object) -> None:
        self._gate, self._owner = gate, owner

    def __enter__(self) -> Gate:
        self._gate.enter(self._owner)
        return self._gate

    def __exit__(self, *exc: object) -> None:
        self._gate.exit()


class SharedGate:
    """Many users at once (a model's getters, tokenizers, context creation); ``close`` marks it
    closing (new users get ClosedError) and waits for the users inside to leave."""

    __slots__ = ("what", "_mutex", "_idle", "_inside", "closing")

    def __init__(self, what: str) -> None:
        self.what = what
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._inside: dict[int, int] = {}  # thread -> depth
        self.closing = False

    def __enter__(self) -> "SharedGate":
        me = _ident()
        with self._mutex:
            if self.closing:
                raise ClosedError(f"{self.what} is closed")
            self._inside[me] = self._inside.get(me, 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        me = _ident()
        with self._mutex:
            n = self._inside[me] - 1
            if n:
                self._inside[me] = n
            else:
                del self._inside[me]
                if not self._inside and self.closing:
                    self._idle.notify_all()

    def shut(self) -> None:
        """Mark closing and wait until nobody is inside (BusyError if the caller itself is)."""
        me = _ident()
        with self._mutex:
            if me in self._inside:
                raise BusyError(f"{self.what} cannot be closed from inside one of its own calls")
            self.closing = True
            while self._inside:
                self._idle.wait()


def _name(owner: object) -> str:
    return getattr(owner, "gate_name", None) or type(owner).__name__
