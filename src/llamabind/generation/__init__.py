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
from .budget import ReasoningBudget
from .events import Cancel, DoneEvent, Timings, TokenEvent, Usage, itl_stats
from .loop import SeqState, reuse_refused, run
from .scoring import choice_probs, classify, next_logits
from .stop import StopMatcher

__all__ = ["Cancel", "DoneEvent", "Messages", "Prompt", "ReasoningBudget", "SeqState", "StopMatcher", "Timings",
           "TokenEvent", "Usage", "choice_probs", "classify", "complete", "finish", "generate", "generate_after",
           "generate_many", "itl_stats", "next_logits", "render_prompt", "reuse_refused", "run"]
