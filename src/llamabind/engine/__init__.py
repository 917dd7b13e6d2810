"""The engine floor: continuous batching for servers. A synchronous core (``Engine``: submit,
step, cancel) and the thread and asyncio facades that drive it."""

from .core import Engine, EngineMetrics, Event
from .facade import AsyncEngine, EngineThread, RequestHandle
from .request import Request, RequestMetrics

__all__ = ["AsyncEngine", "Engine", "EngineMetrics", "EngineThread", "Event", "Request", "RequestHandle",
           "RequestMetrics"]
