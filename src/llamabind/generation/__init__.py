"""The generation floor: events, stop strings, the decode loop and the calls built on it."""

from .api import (
           Messages,
           Prompt,
           complete,
           finish,
           generate,
           generate_after,
           generate_many,
           render_prompt,
)
from .events import Cancel, DoneEvent, Timings, TokenEvent, Usage
from .loop import SeqState, run
from .stop import StopMatcher

__all__ = ["Cancel", "DoneEvent", "Messages", "Prompt", "SeqState", "StopMatcher", "Timings", "TokenEvent", "Usage",
           "complete", "finish", "generate", "generate_after", "generate_many", "render_prompt", "run"]
