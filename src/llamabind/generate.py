"""The decode loop: prompt prefill with KV-prefix reuse, sampling, streaming UTF-8-safe text,
stop strings, limits, cancellation, and several sequences decoded together.

``generate(ctx, prompt)`` streams ``TokenEvent``s and ends with one ``DoneEvent``;
``generate_many(ctx, prompts)`` does the same for N prompts in one context (one batch
per step), each event tagged with its prompt's ``index``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from .batch import Batch
from .raw import ffi, lib, clear_errors
from .context import Context
from .context import PerfData
from .errors import AbortedError, ContextOverflowError, InvalidInputError, LlamaError
from .sampler import Sampler, sample_fast
from .vocab import as_tokens

Prompt = Union[str, Sequence[int], np.ndarray]
_NO_PERF = PerfData(0.0, 0.0, 0.0, 0, 0, 0)
Messages = Sequence[Mapping[str, str]]


@dataclass(slots=True)
class TokenEvent:
    """One generated token and the text it released (held-back or incomplete text comes later).

    ``token`` is None for the final flush of held-back text when generation ends.
    """

    token: int | None
    text: str
    index: int = 0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Timings:
    """Wall-clock time to first token, and llama.cpp's own prompt and generation rates."""

    ttft_s: float
    prompt_tps: float
    generation_tps: float
    prompt_ms: float
    generation_ms: float


@dataclass(slots=True)
class DoneEvent:
    """The end of one sequence: why it stopped (``stop``, ``length``, ``cancelled``, ``error``),
    counts, timings, and all that was generated. With ``error`` the exception is in ``error``,
    and the generator raises it right after its last DoneEvent."""

    finish_reason: str
    usage: Usage
    timings: Timings
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    index: int = 0
    error: BaseException | None = None


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


def render_prompt(ctx: Context, prompt: Prompt | None = None, messages: Messages | None = None,
                  template: str | None = None, add_special: bool = True,
                  parse_special: bool = True) -> np.ndarray:
    """Tokens for a text prompt, a token list, or chat messages rendered with the chat template."""
    vocab = ctx.vocab
    if messages is not None:
        if prompt is not None:
            raise InvalidInputError("give a prompt or messages, not both")
        text = ctx.model.apply_chat_template(messages, True, template)
        bos = vocab.bos
        starts_with_bos = bos is not None and text.startswith(vocab.text(bos))
        tokens = vocab.tokenize(text, add_special=add_special and not starts_with_bos, parse_special=True)
    elif isinstance(prompt, (str, bytes)):
        tokens = vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
    elif prompt is None:
        raise InvalidInputError("a prompt or messages is required")
    else:
        tokens = as_tokens(prompt)
        vocab.check_tokens(tokens)
    if tokens.size == 0:
        raise InvalidInputError("empty prompt: nothing to decode")
    return tokens


class _Seq:
    """Per-sequence state of a generation."""

    __slots__ = ("index", "seq_id", "sampler", "detok", "stop", "max_tokens", "prompt", "n_cached",
                 "n_pos", "out", "text", "reason", "hit", "pending_token", "row", "t_first", "n_prompt",
                 "ignore_eog", "prefill")

    def __init__(self, ctx: Context, index: int, seq_id: int, prompt: np.ndarray, sampler: Sampler,
                 stop: Iterable[str], max_tokens: int) -> None:
        self.index, self.seq_id, self.prompt, self.sampler = index, seq_id, prompt, sampler
        self.detok = ctx.vocab.detokenizer()
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


def _reusable(ctx: Context, seq_id: int, n_keep: int) -> int:
    """How much of a cached prefix of ``n_keep`` tokens may really be kept.

    A sliding-window cache that is not full-size has dropped the cells older than the window
    behind its newest position; continuing at ``n_keep`` needs the window behind ``n_keep``,
    so a prefix is kept only if the sequence's oldest cell is still within it (as llama-server
    checks). Recurrent and hybrid memories keep no per-position history: nothing is reused.
    """
    model = ctx.model
    if n_keep <= 0 or model.is_recurrent or model.is_hybrid:
        return 0
    n_swa = model.n_swa
    if n_swa > 0:
        pos_min = lib.llama_memory_seq_pos_min(lib.llama_get_memory(ctx.ptr), seq_id)
        if pos_min > max(0, n_keep - n_swa):
            return 0
    return n_keep


def _reuse_prefix(ctx: Context, seqs: list[_Seq], reuse_cache: bool) -> None:
    """Keep each sequence's longest cached prompt prefix in the KV cache and drop the rest."""
    mem, tokens = ctx.memory, ctx.tokens
    for s in seqs:
        n_keep = tokens.common_prefix(s.seq_id, s.prompt) if reuse_cache else 0
        n_keep = _reusable(ctx, s.seq_id, min(n_keep, s.prompt.size - 1))  # the last token is decoded for its logits
        if n_keep > 0 and mem.seq_rm(s.seq_id, n_keep, -1):
            s.n_cached = n_keep
        else:
            n_keep = 0
            mem.seq_rm(s.seq_id, -1, -1)
        tokens.set(s.seq_id, s.prompt[:n_keep])
        s.n_pos = n_keep


def _sample(ctx: Context, s: _Seq, cancel: Cancel | None, t0: float) -> TokenEvent | None:
    """Sample the next token of ``s`` from its batch row; set ``s.reason`` when it ends."""
    if cancel is not None and cancel.is_set():
        s.reason = "cancelled"
        return None
    tok = sample_fast(s.sampler, ctx.ptr, s.row, ctx.n_vocab)
    if not s.t_first:
        s.t_first = time.perf_counter() - t0
    piece, eog = s.detok.entry(tok)
    if eog and not s.ignore_eog:
        s.reason = "stop"
        return None
    s.out.append(tok)
    text, hit = s.stop.push(s.detok.feed_piece(piece))
    if text:
        s.text.append(text)
    if hit:
        s.reason, s.hit = "stop", True
    elif len(s.out) >= s.max_tokens or s.n_pos >= ctx.n_ctx_seq:
        s.reason = "length"
    else:
        s.pending_token = tok
    return TokenEvent(tok, text, s.index)


def _sample_all(ctx: Context, seqs: Iterable[_Seq], cancel: Cancel | None, t0: float) -> list[TokenEvent]:
    events = []
    for s in seqs:
        ev = _sample(ctx, s, cancel, t0)
        if ev is not None:
            events.append(ev)
    return events


def _drop_unfinished(ctx: Context, seqs: Iterable[_Seq], reason: str) -> None:
    """After an aborted or failed decode: drop what it may have written, end the sequences."""
    for s in seqs:
        if s.reason is None:
            ctx.memory.seq_rm(s.seq_id, s.n_pos, -1)
            s.reason = reason


def _prefill_media(ctx: Context, seqs: list[_Seq], cancel: Cancel | None, t0: float) -> list[TokenEvent]:
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


def _prefill(ctx: Context, batch: Batch, todo: list[_Seq], seqs: list[_Seq], cancel: Cancel | None,
             t0: float) -> Iterator[TokenEvent]:
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
        with ctx.hold():
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


def _decode_steps(ctx: Context, batch: Batch, seqs: list[_Seq], cancel: Cancel | None,
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
        with ctx.hold():
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


def _done(s: _Seq, perf, error: BaseException | None) -> Iterator[TokenEvent | DoneEvent]:
    tail = "" if s.hit else s.stop.flush() + s.detok.flush()
    if tail:
        s.text.append(tail)
        yield TokenEvent(None, tail, s.index)
    reason = "error" if error is not None and s.reason in (None, "error") else (s.reason or "cancelled")
    yield DoneEvent(
        finish_reason=reason, usage=Usage(max(s.n_prompt, 0), s.n_cached, len(s.out)),
        timings=Timings(s.t_first, perf.prompt_tps, perf.eval_tps, perf.t_p_eval_ms, perf.t_eval_ms),
        text="".join(s.text), tokens=s.out, index=s.index, error=error if reason == "error" else None)


def _run(ctx: Context, seqs: list[_Seq], *, reuse_cache: bool, cancel: Cancel | None) -> Iterator:
    """Drive all sequences to completion, yielding TokenEvent and DoneEvent objects.

    A failure part-way (a full KV cache, a failing callback or sampler) still ends every
    sequence with its DoneEvent (``finish_reason="error"``, what was generated so far), then
    raises the error, with ``error.done`` holding those DoneEvents.
    """
    error: BaseException | None = None
    with ctx.lease():
        t0 = time.perf_counter()
        try:
            if cancel is not None:
                ctx.use_abort_flag(cancel.flag)
            ctx.perf_reset()
            batch = Batch(ctx.n_batch, 1)
            media = [s for s in seqs if s.prompt.size == 0]
            if media:
                with ctx.hold():
                    events = _prefill_media(ctx, media, cancel, t0)
                yield from events
            todo = [s for s in seqs if s.prompt.size]
            with ctx.hold():
                _reuse_prefix(ctx, todo, reuse_cache)
            yield from _prefill(ctx, batch, todo, seqs, cancel, t0)
            yield from _decode_steps(ctx, batch, seqs, cancel, t0)
        except (LlamaError, MemoryError) as e:
            error = e
        except Exception as e:  # a user's sampler or callback: the caller gets it, and the text so far
            error = e
        finally:
            if cancel is not None and not ctx.closed:
                ctx.restore_abort()
        if error is not None and not ctx.closed:
            with ctx.hold():
                _drop_unfinished(ctx, seqs, "error")
        perf = ctx.perf() if not ctx.closed else _NO_PERF
        done: list[DoneEvent] = []
        for s in seqs:
            for ev in _done(s, perf, error):
                if isinstance(ev, DoneEvent):
                    done.append(ev)
                yield ev
    if error is not None:
        try:
            error.done = done  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise error
def _check_ctx(ctx: Context, max_tokens: int | Sequence[int]) -> None:
    """What every generation needs of its context before anything runs."""
    if not ctx.causal_attn or not ctx.model.has_decoder:
        raise InvalidInputError("generation needs a decoder with causal attention (set_causal_attn(True))")
    for m in ([max_tokens] if isinstance(max_tokens, int) else list(max_tokens)):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise InvalidInputError(f"max_tokens must be an int >= 1, not {m!r}")


def _check_fit(ctx: Context, tokens: np.ndarray, index: int = 0) -> None:
    if tokens.size >= ctx.n_ctx_seq:
        raise ContextOverflowError(
            f"prompt {index} has {tokens.size} tokens; the context holds {ctx.n_ctx_seq} per sequence "
            f"(leave room to generate: raise n_ctx or shorten the prompt)")


def generate(ctx: Context, prompt: Prompt | None = None, *, messages: Messages | None = None,
             max_tokens: int = 256, sampler: Sampler | None = None, stop: Iterable[str] = (),
             seq_id: int = 0, cancel: Cancel | None = None, reuse_cache: bool = True,
             template: str | None = None, add_special: bool = True, parse_special: bool = True,
             ignore_eog: bool = False) -> Iterator[TokenEvent | DoneEvent]:
    """Stream the continuation of ``prompt`` (text or tokens) or chat ``messages``.

    Only the part of the prompt after the longest prefix already in the sequence's KV cache
    is decoded (``usage.cached_tokens``). A prompt that does not fit raises
    ContextOverflowError before anything is decoded. Greedy when ``sampler`` is None.
    ``ignore_eog`` keeps going past end-of-generation tokens (benchmarks).
    """
    _check_ctx(ctx, max_tokens)
    tokens = render_prompt(ctx, prompt, messages, template, add_special, parse_special)
    ctx.check_seq(seq_id)
    _check_fit(ctx, tokens)
    if max_tokens < 1:
        raise InvalidInputError("max_tokens must be >= 1")
    seq = _Seq(ctx, 0, seq_id, tokens, sampler or Sampler.greedy(), stop, max_tokens)
    seq.ignore_eog = ignore_eog
    return _run(ctx, [seq], reuse_cache=reuse_cache, cancel=cancel)


def generate_many(ctx: Context, prompts: Sequence[Prompt], *, max_tokens: int | Sequence[int] = 256,
                  samplers: Sequence[Sampler] | Callable[[int], Sampler] | None = None,
                  stop: Iterable[str] | Sequence[Iterable[str]] = (), cancel: Cancel | None = None,
                  add_special: bool = True, parse_special: bool = True,
                  ignore_eog: bool = False) -> Iterator[TokenEvent | DoneEvent]:
    """Generate for several prompts at once, sequence ids 0..N-1, one batch per step.

    Each prompt has its own sampler (a list, or a factory called with the index; greedy by
    default), stop strings and token limit; events carry the prompt's ``index``.
    """
    _check_ctx(ctx, max_tokens)
    if not prompts:
        raise InvalidInputError("no prompts")
    n = len(prompts)
    if n > ctx.n_seq_max or n > ctx.n_batch:
        raise InvalidInputError(f"{n} prompts but the context has n_seq_max={ctx.n_seq_max}, n_batch={ctx.n_batch}")
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    if isinstance(stop, str):
        stop = [stop]
    stops: list[Iterable[str]] = (list(stop) if stop and not isinstance(next(iter(stop)), str)
                                  else [list(stop)] * n)  # type: ignore[list-item, arg-type]
    if len(limits) != n or len(stops) != n:
        raise InvalidInputError("max_tokens and stop must give one value per prompt")
    if samplers is None:
        smpls = [Sampler.greedy() for _ in range(n)]
    elif callable(samplers):
        smpls = [samplers(i) for i in range(n)]
    else:
        smpls = list(samplers)
        if len(smpls) != n or len({id(s) for s in smpls}) != n:
            raise InvalidInputError("give one distinct sampler per prompt")
    seqs = []
    for i, p in enumerate(prompts):
        toks = render_prompt(ctx, p, None, None, add_special, parse_special)
        _check_fit(ctx, toks, i)
        seqs.append(_Seq(ctx, i, i, toks, smpls[i], stops[i], limits[i]))
        seqs[-1].ignore_eog = ignore_eog
    return _run(ctx, seqs, reuse_cache=False, cancel=cancel)


def generate_after(ctx: Context, n_past: int | None = None, *, prefill: Callable[[], int] | None = None,
                   n_prompt: int | None = None, seq_id: int = 0, max_tokens: int = 256,
                   sampler: Sampler | None = None, stop: Iterable[str] = (),
                   cancel: Cancel | None = None) -> Iterator[TokenEvent | DoneEvent]:
    """Continue a sequence whose input was decoded by other means (e.g. libmtmd chunks).

    Either ``n_past``: the positions already in the sequence, whose last decode produced
    logits for the last one; or ``prefill``: a callable that decodes the input and returns
    ``n_past``, run inside the generation (the context is held, ``cancel`` applies, and
    ``timings.ttft_s`` counts it). ``n_prompt`` (default ``n_past``) is reported as
    ``usage.prompt_tokens``. The sequence is not reused as a text prefix afterwards.
    """
    _check_ctx(ctx, max_tokens)
    ctx.check_seq(seq_id)
    if (n_past is None) == (prefill is None):
        raise InvalidInputError("give n_past or prefill")
    if n_past is not None and not 0 < n_past < ctx.n_ctx_seq:
        raise ContextOverflowError(f"n_past={n_past} must be in (0, {ctx.n_ctx_seq})")
    past = n_past
    if max_tokens < 1:
        raise InvalidInputError("max_tokens must be >= 1")
    seq = _Seq(ctx, 0, seq_id, np.empty(0, np.int32), sampler or Sampler.greedy(), stop, max_tokens)
    seq.row = -1
    seq.prefill = prefill if prefill is not None else (lambda: int(past or 0))
    seq.n_prompt = -1 if n_prompt is None else n_prompt  # -1: report n_past
    return _run(ctx, [seq], reuse_cache=False, cancel=cancel)


def complete(ctx: Context, prompt: Prompt | None = None, **kwargs) -> DoneEvent:
    """Run ``generate`` to the end and return its DoneEvent (``.text`` holds the whole text)."""
    done = None
    for ev in generate(ctx, prompt, **kwargs):
        if isinstance(ev, DoneEvent):
            done = ev
    if done is None:
        raise LlamaError("generation ended without a result")
    return done
