"""Facades over the synchronous core: a thread that drives the engine, with each request's events
on its own queue (``EngineThread``), and the same for asyncio (``AsyncEngine``). Submitting and
cancelling work from any thread or task; the event loop never waits on llama.cpp."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import defaultdict
from typing import Any, AsyncGenerator, Callable, Iterator

from .. import _shutdown
from ..errors import BusyError, ClosedError, LlamaError
from ..generation.events import DoneEvent
from .core import Engine, Event

Sink = Callable[[list[Event]], None]


class _Driver:
    """The thread that owns the engine (one per engine): steps while there is work, hands events
    to sinks. At interpreter exit it is stopped, and its decode aborted, before handles are freed."""

    def __init__(self, engine: Engine) -> None:
        if engine.driver is not None:
            raise BusyError("this engine already has a driver (one EngineThread or AsyncEngine per Engine)")
        engine.driver = self
        self.engine = engine
        self._sinks: dict[int, Sink] = {}
        self._reg = threading.Lock()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llamabind-engine", daemon=True)
        self._thread.start()
        _shutdown.at_exit(self.close)

    def submit(self, sink: Sink, options: dict[str, Any]) -> int:
        if self._stop:
            raise ClosedError("the engine is closed")
        state = self.engine.prepare(**options)  # checked, rendered, tokenized: no lock held
        with self._reg:  # registered before the driver can see the request
            self._sinks[state.id] = sink
        try:
            return self.engine.enqueue(state)
        except BaseException:
            with self._reg:
                self._sinks.pop(state.id, None)
            raise

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop:
                eng.wake.clear()
                if not eng.has_work:
                    eng.wake.wait(0.5)
                    continue
                self._dispatch(eng.step())
        except BaseException as e:  # the engine itself failed: every request ends with it
            self.error = e
        finally:
            self._stop = True
            try:
                self._dispatch(eng.close(self.error))
            except BaseException as e:  # never leave the consumers below waiting
                self.error = self.error or e
            with self._reg:
                orphans, self._sinks = self._sinks, {}
            for rid, sink in orphans.items():  # never leave a consumer waiting
                sink([_failed(rid, self.error)])

    def _dispatch(self, events: list[Event]) -> None:
        if not events:
            return
        by: defaultdict[int, list[Event]] = defaultdict(list)
        for ev in events:
            by[ev.index].append(ev)
        with self._reg:
            sinks = [(self._sinks.get(rid), evs) for rid, evs in by.items()]
            for rid, evs in by.items():
                if isinstance(evs[-1], DoneEvent):
                    self._sinks.pop(rid, None)
        for sink, evs in sinks:
            if sink is not None:
                sink(evs)

    def close(self, timeout: float | None = None) -> None:
        """Stop stepping (a running decode is aborted) and wait for the thread to end."""
        self._stop = True
        self.engine.wake.set()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            if not self.engine.ctx.closed:
                self.engine.ctx.abort()
            self._thread.join(timeout)


def _failed(rid: int, error: BaseException | None) -> DoneEvent:
    from ..generation.events import Timings, Usage
    err = error if error is not None else ClosedError("the engine closed before the request finished")
    return DoneEvent("error", Usage(0, 0, 0), Timings(0.0, 0.0, 0.0, 0.0, 0.0), index=rid, error=err)


class RequestHandle:
    """One request submitted to an EngineThread: iterate it for its events, or wait for ``result``."""

    def __init__(self, driver: _Driver, options: dict[str, Any]) -> None:
        self._q: queue.SimpleQueue[list[Event]] = queue.SimpleQueue()
        self._driver = driver
        self.done: DoneEvent | None = None
        self.id = driver.submit(self._q.put, options)

    def __iter__(self) -> Iterator[Event]:
        while self.done is None:
            for ev in self._q.get():
                if isinstance(ev, DoneEvent):
                    self.done = ev
                yield ev

    def events(self) -> Iterator[Event]:
        """The events; leaving the loop early cancels the request (the consumer went away)."""
        try:
            yield from self
        finally:
            if self.done is None:
                self.cancel()

    def cancel(self) -> None:
        self._driver.engine.cancel(self.id)

    def result(self) -> DoneEvent:
        """Wait for the end; the DoneEvent (``finish_reason``, ``text``, ``usage``, ``metrics``)."""
        for _ in self:
            pass
        assert self.done is not None
        return self.done


class EngineThread:
    """An Engine driven by a background thread; ``submit``, ``generate`` and ``complete`` from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._driver = _Driver(engine)

    def submit(self, **options: Any) -> RequestHandle:
        return RequestHandle(self._driver, options)

    def generate(self, **options: Any) -> Iterator[Event]:
        """Stream one request's events; closing the iterator early cancels the request."""
        return self.submit(**options).events()

    def complete(self, **options: Any) -> DoneEvent:
        return self.submit(**options).result()

    def close(self) -> None:
        """Stop the thread; running requests end with ``cancelled``."""
        self._driver.close()

    def __enter__(self) -> "EngineThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEngine:
    """An Engine for asyncio: ``async for ev in engine.stream(...)``; a stream that is closed or
    whose task is cancelled cancels its request. The engine runs on its own thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._driver = _Driver(engine)

    async def stream(self, **options: Any) -> AsyncGenerator[Event, None]:
        """The request's events. It is checked and rendered (a chat template takes milliseconds)
        on a worker thread, so the event loop goes on serving others meanwhile."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[list[Event]] = asyncio.Queue()

        def sink(evs: list[Event]) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, evs)
            except RuntimeError:  # the loop is gone: nobody listens any more
                pass

        submitted = loop.run_in_executor(None, self._driver.submit, sink, options)
        try:
            rid = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # cancelled while it rendered: cancel the request once it is queued
            def cancel_late(f: "asyncio.Future[int]") -> None:
                if not f.cancelled() and f.exception() is None:
                    self.engine.cancel(f.result())

            submitted.add_done_callback(cancel_late)
            raise
        done = False
        try:
            while not done:
                for ev in await q.get():
                    done = done or isinstance(ev, DoneEvent)
                    yield ev
        finally:
            if not done:
                self.engine.cancel(rid)

    async def complete(self, **options: Any) -> DoneEvent:
        last = None
        async for ev in self.stream(**options):
            last = ev
        if not isinstance(last, DoneEvent):
            raise LlamaError("the request ended without a result")
        return last

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._driver.close)

    def close(self) -> None:
        self._driver.close()
