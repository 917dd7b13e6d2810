"""Interpreter exit with work in flight: before any handle's finalizer runs, engine drivers are
stopped (their decodes aborted) and every open model is closed, its contexts first (each aborts
a running decode and waits for it). Without this, the finalizers would free a context under a
daemon thread that is still inside llama_decode."""

from __future__ import annotations

import atexit
import weakref
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .model import Model

EXIT_TIMEOUT = 30.0  # seconds a driver gets to stop at exit

_stoppers: list[weakref.WeakMethod] = []
_models: "weakref.WeakSet[Model]" = weakref.WeakSet()


def at_exit(stop: Callable[[float], None]) -> None:
    """Call the bound method ``stop(timeout)`` at exit (held weakly), before any model closes."""
    _stoppers[:] = [ref for ref in _stoppers if ref() is not None]  # drivers long gone
    _stoppers.append(weakref.WeakMethod(stop))  # type: ignore[arg-type]


def track(model: "Model") -> None:
    """Close ``model`` at exit, before its finalizer could free it under a running decode."""
    _models.add(model)


def _close_all() -> None:
    for ref in _stoppers:
        stop = ref()
        if stop is not None:
            stop(EXIT_TIMEOUT)
    for model in list(_models):
        model.close()


class _Anchor:
    pass


# weakref.finalize registers its own exit hook when the first finalizer is made; atexit runs the
# newest hook first, so ours is registered after it and runs before every finalizer.
weakref.finalize(_Anchor(), lambda: None)
atexit.register(_close_all)
