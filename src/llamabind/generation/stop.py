"""Stop strings: text is released only once it can no longer become one."""

from __future__ import annotations

from typing import Iterable

from ..errors import InvalidInputError


class StopMatcher:
    """Releases text unless it may still become one of the stop strings."""

    __slots__ = ("stops", "pending")

    def __init__(self, stops: Iterable[str]) -> None:
        if isinstance(stops, str):  # one stop string, not a set of one-character stops
            stops = [stops]
        self.stops = [s for s in stops if s]
        if not all(isinstance(s, str) for s in self.stops):
            raise InvalidInputError("stop strings must be str")
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        pending = self.pending + text
        hit = -1
        for s in self.stops:
            i = pending.find(s)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            self.pending = ""
            return pending[:hit], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(pending) - hold
        self.pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
