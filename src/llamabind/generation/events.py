"""What a generation yields: a TokenEvent per token, a DoneEvent per sequence; and Cancel, the
flag that stops one from any thread."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..chat.types import ChatDelta, ChatMessage
from ..raw import ffi
from .logprobs import TokenLogprob


@dataclass(slots=True)
class TokenEvent:
    """One generated token and the text it released (held-back or incomplete text comes later).

    ``token`` is None for the final flush of held-back text when generation ends. In a chat
    generation ``deltas`` holds what the text changed in the parsed assistant message
    (content, reasoning, tool-call pieces), shaped like OpenAI's stream. ``time`` is
    ``time.perf_counter()`` when the token was sampled (nobody needs to re-time tokens). The
    engine sets ``index`` to the request id and ``logprob`` where the request asked for it.
    """

    token: int | None
    text: str
    index: int = 0
    deltas: Sequence[ChatDelta] = ()  # shared and empty unless a chat parse gave some
    logprob: TokenLogprob | None = None
    time: float = 0.0


@dataclass(slots=True)
class Usage:
    """Token counts: the prompt as decoded (``cached_tokens`` of it reused from the KV cache,
    ``truncated_tokens`` cut from it by ``truncate="left"``) and the tokens generated."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    truncated_tokens: int = 0


@dataclass(slots=True)
class Timings:
    """Wall-clock time to first token, llama.cpp's own prompt and generation rates, and the
    wall-clock gaps between tokens (inter-token latency: mean, median, 95th percentile)."""

    ttft_s: float
    prompt_tps: float
    generation_tps: float
    prompt_ms: float
    generation_ms: float
    itl_mean_s: float = 0.0
    itl_p50_s: float = 0.0
    itl_p95_s: float = 0.0


def itl_stats(times: Sequence[float]) -> tuple[float, float, float]:
    """Inter-token latency (mean, p50, p95) in seconds from the tokens' sampling times."""
    if len(times) < 2:
        return 0.0, 0.0, 0.0
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    p50, p95 = np.percentile(gaps, (50, 95))
    return float(gaps.mean()), float(p50), float(p95)


@dataclass(slots=True)
class DoneEvent:
    """The end of one sequence: why it stopped (``stop``, ``length``, ``cancelled``, ``error``,
    or ``tool_calls`` when a chat response ended in tool calls), counts, timings, and all that
    was generated; ``message`` is a chat generation's parsed assistant message. With ``error``
    the exception is in ``error``, and the generator raises it right after its last DoneEvent."""

    finish_reason: str
    usage: Usage
    timings: Timings
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    index: int = 0
    error: BaseException | None = None
    message: ChatMessage | None = None
    metrics: Any = None  # the engine's RequestMetrics


class Cancel:
    """Cancels a running generation from any thread, also in the middle of a prompt prefill.

    The flag is read by a C abort callback between graph nodes, so waiting for it costs
    nothing; the context stays usable afterwards.
    """

    __slots__ = ("flag",)

    def __init__(self) -> None:
        self.flag = ffi.new("int *")  # the C int the abort callback reads

    def set(self) -> None:
        self.flag[0] = 1

    def clear(self) -> None:
        self.flag[0] = 0

    def is_set(self) -> bool:
        return self.flag[0] != 0
