"""The decode loop: prompt prefill with KV-prefix reuse, sampling, streaming UTF-8-safe text,
stop strings, limits and cancellation for several sequences in one context, one batch per step.

``SeqState`` is one sequence's progress; ``run`` drives a list of them to the end, holding the
context's lease for the whole generation and its lock for each step.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, Iterable, Iterator

import numpy as np

from ..batch import Batch
from ..chat import ChatParser
from ..context import Context, PerfData
from ..errors import AbortedError, InvalidInputError
from ..model import Model
from ..raw import clear_errors, ffi, lib
from ..sampler import Sampler, sample_fast
from .budget import ReasoningBudget
from .events import Cancel, DoneEvent, Timings, TokenEvent, Usage, itl_stats
from .stop import StopMatcher

_NO_PERF = PerfData(0.0, 0.0, 0.0, 0, 0, 0)
Hold = Any  # ``ctx.hold(lease)``: re-enterable, one per generation


class SeqState:
    """Per-sequence state of a generation."""

    __slots__ = ("index", "seq_id", "sampler", "detok", "stop", "max_tokens", "prompt", "n_cached",
                 "n_pos", "out", "text", "reason", "hit", "pending_token", "row", "t_first", "n_prompt",
                 "ignore_eog", "prefill", "parser", "times", "budget", "n_truncated")

    def __init__(self, ctx: Context, index: int, seq_id: int, prompt: np.ndarray, sampler: Sampler,
                 stop: Iterable[str], max_tokens: int, render: Iterable[int] = ()) -> None:
        self.index, self.seq_id, self.prompt, self.sampler = index, seq_id, prompt, sampler
        self.detok = ctx.vocab.detokenizer(render=render)
        self.stop = StopMatcher(stop)
        self.max_tokens = max_tokens
        self.n_cached = 0
        self.n_pos = 0          # tokens of this sequence in the KV cache
        self.out: list[int] = []
        self.text: list[str] = []
        self.reason: str | None = None
        self.hit = False         # ended by a stop string
        self.pending_token = -1  # sampled, not yet decoded
        self.row = -1            # batch row whose logits this sequence samples from
        self.t_first = 0.0
        self.n_prompt = int(prompt.size)
        self.ignore_eog = False
        self.prefill: Callable[[], int] | None = None  # for an empty prompt: decodes the input, returns n_past
        self.parser: ChatParser | None = None  # a chat generation's output parser
        self.times: list[float] = []  # perf_counter() of each generated token
        self.budget: ReasoningBudget | None = None  # forces the end of thinking after N reasoning tokens
        self.n_truncated = 0  # prompt tokens cut by truncate="left"


def reuse_refused(model: Model) -> str | None:
    """Why a model's KV cache cannot keep a prompt prefix across generations, or None if it can."""
    if model.is_recurrent or model.is_hybrid:
        return "recurrent and hybrid memories keep no per-position history: every prompt is decoded in full"
    return None


def _reusable(ctx: Context, seq_id: int, n_keep: int) -> int:
    """How much of a cached prefix of ``n_keep`` tokens may really be kept.

    A sliding-window cache that is not full-size has dropped the cells older than the window
    behind its newest position; continuing at ``n_keep`` needs the window behind ``n_keep``,
    so a prefix is kept only if the sequence's oldest cell is still within it (as llama-server
    checks). Recurrent and hybrid memories keep no per-position history: nothing is reused.
    """
    model = ctx.model
    if n_keep <= 0 or reuse_refused(model) is not None:
        return 0
    n_swa = model.n_swa
    if n_swa > 0:
        pos_min = lib.llama_memory_seq_pos_min(lib.llama_get_memory(ctx.ptr), seq_id)
        if pos_min > max(0, n_keep - n_swa):
            return 0
    return n_keep


def keep_prefix(ctx: Context, seq_id: int, prompt: np.ndarray, reuse_cache: bool) -> int:
    """Keep the longest usable cached prefix of ``prompt`` in the sequence, drop the rest; its length."""
    mem, tokens = ctx.memory, ctx.tokens
    n_keep = tokens.common_prefix(seq_id, prompt) if reuse_cache else 0
    n_keep = _reusable(ctx, seq_id, min(n_keep, prompt.size - 1))  # the last token is decoded for its logits
    if not (n_keep > 0 and mem.seq_rm(seq_id, n_keep, -1)):
        n_keep = 0
        mem.seq_rm(seq_id, -1, -1)
    tokens.set(seq_id, prompt[:n_keep])
    return n_keep


def _reuse_prefix(ctx: Context, seqs: list[SeqState], reuse_cache: bool) -> None:
    """Keep each sequence's longest cached prompt prefix in the KV cache and drop the rest."""
    for s in seqs:
        s.n_cached = s.n_pos = keep_prefix(ctx, s.seq_id, s.prompt, reuse_cache)


def _sample(ctx: Context, s: SeqState, cancel: Cancel | None, t0: float) -> TokenEvent | None:
    """Sample the next token of ``s`` from its batch row; set ``s.reason`` when it ends."""
    if cancel is not None and cancel.is_set():
        s.reason = "cancelled"
        return None
    budget = s.budget
    forced = budget.forced() if budget is not None else None
    if forced is None:
        tok = sample_fast(s.sampler, ctx, s.row)
    else:  # the reasoning budget is spent: its end-of-thinking tokens instead of sampling
        tok = forced
        s.sampler.accept(tok)
    now = time.perf_counter()
    if not s.t_first:
        s.t_first = now - t0
    piece, eog = s.detok.entry(tok)
    if eog and not s.ignore_eog:
        s.reason = "stop"
        return None
    s.out.append(tok)
    s.times.append(now)
    text, hit = s.stop.push(s.detok.feed_piece(piece))
    if budget is not None:
        budget.accept(tok, s.detok.pending)
    if text:
        s.text.append(text)
    if hit:
        s.reason, s.hit = "stop", True
    elif len(s.out) >= s.max_tokens or s.n_pos >= ctx.n_ctx_seq:
        s.reason = "length"
    else:
        s.pending_token = tok
    if s.parser is not None and text:
        return TokenEvent(tok, text, s.index, s.parser.feed(text), None, now)
    return TokenEvent(tok, text, s.index, (), None, now)


def _sample_all(ctx: Context, seqs: Iterable[SeqState], cancel: Cancel | None, t0: float) -> list[TokenEvent]:
    events = []
    for s in seqs:
        ev = _sample(ctx, s, cancel, t0)
        if ev is not None:
            events.append(ev)
    return events


def _drop_unfinished(ctx: Context, seqs: Iterable[SeqState], reason: str) -> None:
    """After an aborted or failed decode: drop what it may have written, end the sequences."""
    for s in seqs:
        if s.reason is None:
            ctx.memory.seq_rm(s.seq_id, s.n_pos, -1)
            s.reason = reason


def _prefill_media(ctx: Context, seqs: list[SeqState], cancel: Cancel | None, t0: float) -> list[TokenEvent]:
    """Sequences whose input is decoded by other means (media chunks): run their prefill
    callable here, inside this generation's hold on ctx, then sample from the last output."""
    events = []
    for s in seqs:
        if s.prefill is None:
            raise InvalidInputError("a sequence without a prompt needs a prefill")
        try:
            s.n_pos = s.prefill()
        except AbortedError:
            s.reason = "cancelled"
            continue
        ctx.tokens.forget(s.seq_id)  # never a text prefix to reuse
        if s.n_prompt < 0:
            s.n_prompt = s.n_pos
        if ctx.n_outputs < 1 or lib.llama_get_logits_ith(ctx.ptr, -1) == ffi.NULL:
            clear_errors()
            raise InvalidInputError("the input was decoded without logits for its last position "
                                    "(decode it with logits on the last token, e.g. eval_chunks(logits_last=True))")
        s.row = -1
        events += _sample_all(ctx, [s], cancel, t0)
    return events


def _prefill(ctx: Context, hold: Hold, batch: Batch, todo: list[SeqState], seqs: list[SeqState],
             cancel: Cancel | None, t0: float) -> Iterator[TokenEvent]:
    """The rest of every prompt, packed into batches of at most n_batch tokens; a sequence
    samples its first token right after the batch holding its last prompt token."""
    while todo:
        batch.clear()
        room, in_batch = ctx.n_batch, []
        for s in todo:
            if room == 0:
                break
            take = min(room, s.prompt.size - s.n_pos)
            last = s.n_pos + take == s.prompt.size
            rows = batch.add(s.prompt[s.n_pos:s.n_pos + take], s.n_pos, s.seq_id, logits="last" if last else False)
            in_batch.append((s, take))
            room -= take
            s.row = rows.stop - 1
        with hold:
            try:
                ctx.run(batch)
            except AbortedError:
                _drop_unfinished(ctx, seqs, "cancelled")
                return
            events = []
            for s, take in in_batch:
                ctx.tokens.extend(s.seq_id, s.prompt[s.n_pos:s.n_pos + take])
                s.n_pos += take
                if s.n_pos == s.prompt.size:
                    events += _sample_all(ctx, [s], cancel, t0)
        yield from events
        todo = [s for s in todo if s.n_pos < s.prompt.size and s.reason is None]


def _decode_steps(ctx: Context, hold: Hold, batch: Batch, seqs: list[SeqState], cancel: Cancel | None,
                  t0: float) -> Iterator[TokenEvent]:
    """One batch per step holding the next token of every active sequence."""
    tok_arr, pos_arr = batch.token, batch.pos
    active = [s for s in seqs if s.reason is None]
    layout = None  # the sequences the batch rows were set up for
    while active:
        if layout != active:  # rows change only when a sequence ends
            layout = active
            n = len(active)
            for r, s in enumerate(active):
                s.row = r
            batch.seq_id[:n, 0] = [s.seq_id for s in active]
            batch.n_seq_id[:n] = 1
            batch.logits[:n] = 1
            batch.n_tokens = n
        for r, s in enumerate(active):
            tok_arr[r] = s.pending_token
            pos_arr[r] = s.n_pos
        with hold:
            try:
                ctx.run(batch, all_outputs=True)
            except AbortedError:
                _drop_unfinished(ctx, active, "cancelled")
                return
            tokens = ctx.tokens
            for s in active:
                tokens.append(s.seq_id, s.pending_token)
                s.n_pos += 1
            events = _sample_all(ctx, active, cancel, t0)
        yield from events
        if any(s.reason is not None for s in active):
            active = [s for s in active if s.reason is None]


def _done(s: SeqState, perf, error: BaseException | None) -> Iterator[TokenEvent | DoneEvent]:
    tail = "" if s.hit else s.stop.flush() + s.detok.flush()
    if tail:
        s.text.append(tail)
    message = None
    deltas = s.parser.finish(tail) if s.parser is not None else ()
    if tail or deltas:
        yield TokenEvent(None, tail, s.index, deltas, None, time.perf_counter())
    reason = "error" if error is not None and s.reason in (None, "error") else (s.reason or "cancelled")
    if s.parser is not None:
        message = s.parser.message
        if reason == "stop" and message.tool_calls:
            reason = "tool_calls"
    yield DoneEvent(
        finish_reason=reason, usage=Usage(max(s.n_prompt, 0), s.n_cached, len(s.out), s.n_truncated),
        timings=Timings(s.t_first, perf.prompt_tps, perf.eval_tps, perf.t_p_eval_ms, perf.t_eval_ms,
                        *itl_stats(s.times)),
        text="".join(s.text), tokens=s.out, index=s.index, error=error if reason == "error" else None,
        message=message)


def _steps(ctx: Context, hold: Hold, seqs: list[SeqState], reuse_cache: bool, cancel: Cancel | None,
           t0: float) -> Generator[TokenEvent, None, None]:
    """Every TokenEvent of a generation: media prefill, prompt prefill, then one batch per step."""
    batch = Batch(ctx.n_batch, 1)
    media = [s for s in seqs if s.prompt.size == 0]
    if media:
        with hold:
            events = _prefill_media(ctx, media, cancel, t0)
        yield from events
    todo = [s for s in seqs if s.prompt.size]
    with hold:
        _reuse_prefix(ctx, todo, reuse_cache)
    yield from _prefill(ctx, hold, batch, todo, seqs, cancel, t0)
    yield from _decode_steps(ctx, hold, batch, seqs, cancel, t0)


def run(ctx: Context, seqs: list[SeqState], *, reuse_cache: bool, cancel: Cancel | None,
        on_token: Callable[[TokenEvent], object] | None = None) -> Iterator:
    """Drive all sequences to completion, yielding TokenEvent and DoneEvent objects.

    A failure part-way (a full KV cache, a failing callback or sampler) still ends every
    sequence with its DoneEvent (``finish_reason="error"``, what was generated so far), then
    raises the error, with ``error.done`` holding those DoneEvents. ``on_token`` is called
    with each TokenEvent before it is yielded; an exception it raises is such a failure.
    """
    error: BaseException | None = None
    with ctx.lease() as lease:
        hold = ctx.hold(lease)  # the generation's own way in, between the yields
        t0 = time.perf_counter()
        steps = _steps(ctx, hold, seqs, reuse_cache, cancel, t0)
        try:
            if cancel is not None:
                ctx.use_abort_flag(cancel.flag)
            with hold:
                ctx.perf_reset()
            if on_token is None:
                yield from steps
            else:
                for ev in steps:
                    on_token(ev)
                    yield ev
        except Exception as e:  # llama.cpp's, or a user's sampler or callback: raised after the DoneEvents
            error = e
        finally:
            steps.close()
            if cancel is not None and not ctx.closed:
                ctx.restore_abort()
        perf = _NO_PERF
        if not ctx.closed:
            with hold:
                if error is not None:
                    _drop_unfinished(ctx, seqs, "error")
                perf = ctx.perf()
        done: list[DoneEvent] = []
        late: Exception | None = None  # the callback failing on the last flush: raised after the DoneEvents
        for s in seqs:
            for end in _done(s, perf, error):
                if isinstance(end, DoneEvent):
                    done.append(end)
                elif on_token is not None and late is None:
                    try:
                        on_token(end)
                    except Exception as e:
                        late = e
                yield end
    error = error or late
    if error is not None:
        try:
            error.done = done  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise error
