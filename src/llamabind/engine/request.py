"""What a request asks of the engine (``Request``), checked and rendered into tokens at submit
(``prepare``), its progress while it runs (``RequestState``), and its end (``finish``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..chat import ChatParser
from ..context import Context
from ..errors import ContextOverflowError, InvalidInputError
from ..generation.api import Messages, Prompt, render_prompt
from ..generation.chatprep import CHAT_OPTIONS, prepare_chat
from ..generation.events import DoneEvent, Timings, TokenEvent, Usage
from ..generation.stop import StopMatcher
from ..sampler import Sampler
from .ngram import NgramDrafter


@dataclass
class Request:
    """One generation: everything ``generate()`` takes, plus the engine's own options.

    ``prompt`` (text or tokens) or chat ``messages`` (with the chat options of ``generate``).
    Sampling: a ``sampler`` (owned by the engine from submit on), or the usual knobs
    (``temperature`` 0 is greedy, sampled for all greedy requests at once in numpy).
    ``logprobs``/``top_logprobs``: the chosen token's log-probability and the N best, from
    the raw logits. ``n_draft``: speculation, up to that many draft tokens per step, from
    ``draft``: ``"ngram"`` (prompt lookup), ``"model"`` (the engine's draft model) or ``"auto"``
    (the draft model where the engine has one, else n-grams). ``deadline_s``: the request ends with ``finish_reason="deadline"`` that long
    after submit. ``context_shift``: when the sequence reaches the context's end, the oldest
    tokens after ``n_keep`` are shifted out (half of them) instead of ending with ``length``.
    """

    prompt: Prompt | None = None
    messages: Messages | None = None
    max_tokens: int = 256
    stop: Sequence[str] = ()
    ignore_eog: bool = False
    sampler: Sampler | None = None
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None
    logit_bias: Mapping[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    n_draft: int = 0
    draft: str = "auto"
    deadline_s: float | None = None
    context_shift: bool = False
    n_keep: int = 0
    add_special: bool = True
    parse_special: bool = True
    template: str | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: Mapping[str, Any] | None = None
    json_schema: Mapping[str, Any] | None = None
    enable_thinking: bool | None = None
    reasoning_format: str | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    now: int | None = None


REQUEST_FIELDS = frozenset(f.name for f in fields(Request))
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty",
             "seed", "grammar", "logit_bias")


class RequestState:
    """A request's progress: its tokens, where it is in the KV cache, its text and metrics."""

    # what every step reads first, so that it shares a few cache lines (they are cold after a decode)
    __slots__ = ("pending", "n_pos", "reason", "hist", "greedy", "simple", "spec", "t_first", "detok", "out",
                 "t_tokens", "text", "max_tokens", "ignore_eog", "id", "slot", "top_n",
                 "req", "tokens", "n_prompt", "sampler", "stop", "parser", "n_cached", "hit", "error", "wait",
                 "t_submit", "t_admit", "t_prefill", "t_prefill_end", "deadline",
                 "drafter", "model_draft", "n_drafted", "n_accepted", "cancelled", "n_preempted", "shifted")

    def __init__(self, rid: int, req: Request, tokens: np.ndarray, sampler: Sampler | None, stop: list[str],
                 render: Iterable[int], parser: ChatParser | None, ctx: Context, model_draft: bool = False) -> None:
        self.id, self.req, self.tokens = rid, req, tokens
        self.n_prompt = int(tokens.size)
        self.sampler = sampler
        self.greedy = sampler is None  # arg-max over the logits, batched in numpy
        self.detok = ctx.vocab.detokenizer(render=render)
        self.stop = StopMatcher(stop)
        self.parser = parser
        self.slot = -1
        self.n_pos = 0               # positions of this request's sequence in the KV cache
        self.n_cached = 0
        self.hist: list[int] = []    # the tokens in the KV cache, in order (the slot's cached tokens)
        self.out: list[int] = []
        self.text: list[str] = []
        self.pending = -1            # sampled, not yet decoded
        self.reason: str | None = None
        self.hit = False
        self.error: BaseException | None = None
        self.wait: tuple[RequestState, int] | None = None  # (donor, n): copy its first n positions when it has them
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = self.t_prefill = self.t_prefill_end = 0.0
        self.t_tokens: list[float] = []
        self.deadline = None if req.deadline_s is None else self.t_submit + req.deadline_s
        self.model_draft = model_draft and req.n_draft > 0  # drafts from the engine's draft model
        self.drafter = NgramDrafter(tokens) if req.n_draft > 0 and not self.model_draft else None
        self.n_drafted = self.n_accepted = 0
        self.top_n = req.top_logprobs if req.logprobs or req.top_logprobs else -1  # -1: no logprobs
        self.cancelled = False
        self.n_preempted = 0
        self.shifted = False  # positions were shifted: hist is no reusable prefix any more
        self.max_tokens, self.ignore_eog = req.max_tokens, req.ignore_eog
        self.spec = self.drafter is not None or self.model_draft  # speculates
        self.simple = self.drafter is None and not self.stop.stops and parser is None  # a token is text, no more

    @property
    def prefilling(self) -> bool:
        return self.pending < 0 and self.reason is None


# No tokenizer turns more than this many bytes of text into one token on average: a longer prompt
# can never fit its sequence, and is refused before it is tokenized (a million words take seconds).
MAX_BYTES_PER_TOKEN = 64


def _text_bytes(req: Request) -> int:
    """At most the UTF-8 bytes of the request's text (characters of a str: each is one byte or more)."""
    if isinstance(req.prompt, (str, bytes)):
        return len(req.prompt)
    if isinstance(req.messages, (list, tuple)):
        return sum(len(m.get("content") or "") if isinstance(m, dict) and isinstance(m.get("content"), str) else 0
                   for m in req.messages)
    return 0


def prepare(ctx: Context, rid: int, req: Request, has_draft_model: bool = False) -> RequestState:
    """Check ``req`` and render it into tokens; InvalidInputError for anything it cannot run."""
    if _text_bytes(req) > MAX_BYTES_PER_TOKEN * ctx.n_ctx_seq:
        raise ContextOverflowError(f"the prompt's text is over {MAX_BYTES_PER_TOKEN} bytes per token of the "
                                   f"engine's {ctx.n_ctx_seq}-token sequences: it cannot fit")
    if not isinstance(req, Request):
        raise InvalidInputError(f"expected a Request, not {type(req).__name__}")
    m = req.max_tokens
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise InvalidInputError(f"max_tokens must be an int >= 1, not {m!r}")
    for name in ("n_draft", "top_logprobs", "n_keep"):
        v = getattr(req, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InvalidInputError(f"{name} must be an int >= 0, not {v!r}")
    if req.top_logprobs > 20:
        raise InvalidInputError("top_logprobs must be at most 20")
    if req.deadline_s is not None and not req.deadline_s > 0:
        raise InvalidInputError("deadline_s must be > 0")
    if req.n_draft > 16:
        raise InvalidInputError("n_draft must be at most 16")
    if req.draft not in ("auto", "ngram", "model"):
        raise InvalidInputError(f"draft must be 'auto', 'ngram' or 'model', not {req.draft!r}")
    if req.draft == "model" and not has_draft_model:
        raise InvalidInputError("draft='model' needs an engine with a draft model (Engine.load(..., draft_model=))")
    if req.sampler is not None and not isinstance(req.sampler, Sampler):
        raise InvalidInputError(f"sampler must be a Sampler, not {type(req.sampler).__name__}")
    if req.sampler is not None and (req.sampler.closed or req.sampler._owner is not None):
        raise InvalidInputError("this sampler is closed or already belongs to an engine request: "
                                "give each request a sampler of its own")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    chat = {k: getattr(req, k) for k in CHAT_OPTIONS}
    knobs = any(getattr(req, k) != Request.__dataclass_fields__[k].default for k in _SAMPLING)
    if req.sampler is not None and knobs:
        raise InvalidInputError("give a sampler or sampling settings, not both")
    base = req.sampler
    if knobs:
        base = Sampler.from_params(ctx.vocab, **{k: getattr(req, k) for k in _SAMPLING})
    render: Iterable[int] = ()
    parser = None
    if req.messages is not None:
        if req.prompt is not None:
            raise InvalidInputError("give a prompt or messages, not both")
        setup = prepare_chat(ctx, req.messages, req.template, chat, base, stop, req.add_special)
        tokens, sampler, stop, render = setup.tokens, setup.sampler or base, setup.stop, setup.render
        parser = setup.parser()
        if tokens.size == 0:
            raise InvalidInputError("empty prompt: nothing to decode")
    else:
        if any(v is not None for v in chat.values()):
            raise InvalidInputError("chat arguments (tools, response_format, ...) need messages=")
        tokens = render_prompt(ctx, req.prompt, None, req.template, req.add_special, req.parse_special)
        sampler = base
    if tokens.size >= ctx.n_ctx_seq:
        raise ContextOverflowError(f"the prompt has {tokens.size} tokens; the engine's context holds "
                                   f"{ctx.n_ctx_seq} per sequence (leave room to generate)")
    if req.n_keep >= ctx.n_ctx_seq // 2:
        raise InvalidInputError("n_keep must leave at least half of the context to shift")
    # accepted: from here on the sampler is the request's (a refused request leaves it to its caller)
    if sampler is not None and sampler._greedy:
        sampler.close()  # a plain greedy sampler: the batched arg-max does the same
        sampler = None
    if sampler is not None:
        sampler.take(rid)
    model_draft = has_draft_model and req.draft != "ngram"
    return RequestState(rid, req, np.ascontiguousarray(tokens, np.int32), sampler, stop, render, parser, ctx,
                        model_draft)


@dataclass(slots=True)
class RequestMetrics:
    """Where a request's time went; rates in tokens per second, times in seconds."""

    queue_s: float
    ttft_s: float
    itl_p50_s: float
    itl_p95_s: float
    prefill_tps: float
    decode_tps: float
    cached_tokens: int
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    preempted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def metrics_of(s: RequestState) -> RequestMetrics:
    t = s.t_tokens
    itl = np.diff(np.asarray(t)) if len(t) > 1 else np.zeros(0)
    pre_s = s.t_prefill_end - s.t_prefill
    dec_s = t[-1] - t[0] if len(t) > 1 else 0.0
    return RequestMetrics(
        queue_s=max(0.0, s.t_admit - s.t_submit) if s.t_admit else 0.0,
        ttft_s=s.t_first - s.t_submit if s.t_first else 0.0,
        itl_p50_s=float(np.percentile(itl, 50)) if itl.size else 0.0,
        itl_p95_s=float(np.percentile(itl, 95)) if itl.size else 0.0,
        prefill_tps=(s.n_prompt - s.n_cached) / pre_s if pre_s > 0 else 0.0,
        decode_tps=(len(t) - 1) / dec_s if dec_s > 0 else 0.0,
        cached_tokens=s.n_cached, drafted_tokens=s.n_drafted, accepted_tokens=s.n_accepted,
        preempted=s.n_preempted)


def finish(s: RequestState, reason: str, events: list) -> str:
    """The end of ``s``'s output: its held-back text and the parser's last deltas, then its
    DoneEvent; the finish reason it ends with (an output parser that fails here makes it an error)."""
    tail = "" if s.hit else s.stop.flush() + s.detok.flush()
    if tail:
        s.text.append(tail)
    try:
        deltas = s.parser.finish(tail) if s.parser is not None else ()
    except Exception as e:  # the output parser failed on the end of the text: this request's error
        deltas, reason = (), "error"
        s.error = s.error or e
    if tail or deltas:
        events.append(TokenEvent(None, tail, s.id, deltas, None, time.perf_counter()))
    message = s.parser.message if s.parser is not None else None
    if reason == "stop" and message is not None and message.tool_calls:
        reason = "tool_calls"
    m = metrics_of(s)
    timings = Timings(m.ttft_s, m.prefill_tps, m.decode_tps, (s.t_prefill_end - s.t_prefill) * 1e3,
                      (s.t_tokens[-1] - s.t_tokens[0]) * 1e3 if len(s.t_tokens) > 1 else 0.0)
    events.append(DoneEvent(reason, Usage(s.n_prompt, s.n_cached, len(s.out)), timings, "".join(s.text),
                            s.out, s.id, s.error if reason == "error" else None, message, m))
    return reason
