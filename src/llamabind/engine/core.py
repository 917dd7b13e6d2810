"""The engine's synchronous core, free of I/O: requests join and leave a running batch.

``submit`` and ``cancel`` are safe from any thread (they only queue); one owner calls
``step``, which admits queued requests into free slots (reusing the longest cached prefix of
any sequence), decodes one batch (a token or a draft for every generating request, plus prompt
chunks within a prefill budget), and returns the events it produced.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..batch import Batch
from ..context import Context
from ..errors import AbortedError, BusyError, ClosedError, InvalidInputError, KVCacheFullError
from ..generation.events import DoneEvent, TokenEvent
from ..model import Model
from .draft import DraftModel
from .request import REQUEST_FIELDS, Request, RequestState, finish, prepare
from .slots import copy_prefix, place, shift
from .stepper import Step

Event = TokenEvent | DoneEvent


@dataclass(slots=True)
class EngineMetrics:
    """Totals since the engine started; ``kv_tokens`` counts each sequence's cells (shared ones once per
    sequence); ``draft_s`` is the time in the draft model's decodes (not part of ``decode_s``)."""

    steps: int
    step_s: float
    decode_s: float
    tokens_decoded: int
    mean_batch: float
    active: int
    queued: int
    kv_tokens: int
    preempted: int
    draft_s: float = 0.0


class Engine:
    """Continuous batching over one context: one slot per sequence id (``n_seq_max``).

    The context should have a unified KV cache (``kv_unified=True``), so that prompt prefixes
    are shared between sequences without copying data; ``Engine.load`` makes such a context.
    ``prefill_budget`` bounds the prompt tokens decoded per step while others are generating
    (default ``n_batch``, as llama-server packs its batches: the best throughput; a smaller
    budget such as ``n_ubatch`` bounds how long a long prompt delays the others' next token).
    At most ``max_queue`` requests wait for a slot; ``submit`` raises BusyError beyond that.
    ``draft_model``: a model with a compatible vocabulary (InvalidInputError otherwise) that drafts
    for requests with ``n_draft`` on a second context with the same slots (see ``draft.py``).
    """

    def __init__(self, ctx: Context, *, prefill_budget: int | None = None, max_queue: int = 1024,
                 own_context: bool = False, draft_model: Model | None = None) -> None:
        if not isinstance(ctx, Context):
            raise InvalidInputError(f"Engine needs a Context, not {type(ctx).__name__}")
        if not ctx.causal_attn or not ctx.model.has_decoder:
            raise InvalidInputError("the engine needs a decoder with causal attention")
        self.ctx = ctx
        self.n_slots = ctx.n_seq_max
        self.prefill_budget = int(prefill_budget or ctx.n_batch)
        if self.prefill_budget < 1:
            raise InvalidInputError("prefill_budget must be >= 1")
        self.max_queue = max_queue
        self.slots: list[RequestState | None] = [None] * self.n_slots
        self.last_used = [0.0] * self.n_slots
        self._queue: deque[RequestState] = deque()
        self._inbox: deque[tuple[str, Any]] = deque()  # from any thread: ("submit", state) / ("cancel", id)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # submit's bound check and id
        self._n_waiting = 0
        self._own = own_context
        self._share = ctx.kv_unified or self.n_slots == 1  # llama.cpp copies part of a sequence only then
        self._closed = False
        self._error: BaseException | None = None  # set when the engine itself failed: every later call sees it
        self.driver: object = None  # the one thread that drives ``step`` (engine/facade.py), if any
        self._stepper = Step(ctx, Batch(ctx.n_batch, 1))
        self._stepper.ready = self._ready
        self._draft = self._stepper.model = DraftModel(ctx, draft_model) if draft_model is not None else None
        try:
            ctx.claim(self)  # from now on only the engine uses the context (causal attention stays as checked)
        except BaseException:
            if self._draft is not None:
                self._draft.close()
            raise
        self._order: list[RequestState] = []  # running requests, in admission order
        self._full = False  # the KV cache ran out: admit nothing until a running request ends
        self._n_deadlines = 0  # requests with a deadline, queued or running
        self._t_steps = self._t_decode = 0.0
        self._n_steps = self._n_decoded = self._n_preempted = 0
        self.wake = threading.Event()  # set by submit and cancel, for a driver waiting for work

    @classmethod
    def load(cls, model: Model, *, n_slots: int = 4, n_ctx: int = 8192, swa_full: bool = True,
             prefill_budget: int | None = None, max_queue: int = 1024, draft_model: Model | None = None,
             **ctx_params: Any) -> "Engine":
        """An engine over a new context of ``model`` that it owns: ``n_slots`` sequences sharing
        ``n_ctx`` cells of one unified KV cache; a sliding-window cache is kept full-size by default
        so that shared prefixes stay usable. ``draft_model``: see ``Engine``."""
        ctx = Context(model, n_ctx=n_ctx, n_seq_max=n_slots, kv_unified=True, swa_full=swa_full, **ctx_params)
        try:
            return cls(ctx, prefill_budget=prefill_budget, max_queue=max_queue, own_context=True,
                       draft_model=draft_model)
        except BaseException:
            ctx.close()
            raise

    # -- any thread ----------------------------------------------------------------------------
    gate_name = "an engine"

    def submit(self, request: Request | None = None, **options: Any) -> int:
        """Queue a request (a Request, or its fields as keywords); returns its id.

        It is checked and rendered here, in the caller's thread: bad input raises
        InvalidInputError (ContextOverflowError for a prompt that can never fit) before it queues.
        """
        return self.enqueue(self.prepare(request, **options))

    def _check_open(self) -> None:
        if self._error is not None:
            raise ClosedError(f"the engine failed ({self._error}) and is closed") from self._error
        if self._closed:
            raise ClosedError("the engine is closed")
        if self.ctx.closing:
            raise ClosedError("the engine's context is closed")

    def prepare(self, request: Request | None = None, **options: Any) -> RequestState:
        """Check and render a request (no lock held: other threads submit and step meanwhile);
        ``enqueue`` then queues it. Its sampler is the request's from here on."""
        self._check_open()
        if request is None:
            unknown = set(options) - REQUEST_FIELDS
            if unknown:
                raise InvalidInputError(f"unknown request options: {', '.join(sorted(unknown))}")
            request = Request(**options)
        elif options:
            raise InvalidInputError("give a Request or keywords, not both")
        with self._lock:
            if self._n_waiting >= self.max_queue:
                raise BusyError(f"the engine's queue is full ({self.max_queue} requests waiting)")
            rid = next(self._ids)
            self._n_waiting += 1
        try:
            if request.n_draft and (self.ctx.model.is_recurrent or self.ctx.model.is_hybrid):
                raise InvalidInputError("speculative drafts need a memory that can drop positions (not recurrent)")
            return prepare(self.ctx, rid, request, self._draft is not None)
        except BaseException:
            with self._lock:
                self._n_waiting -= 1
            raise

    def enqueue(self, state: RequestState) -> int:
        """Queue a prepared request for the next step; its id."""
        try:
            self._check_open()
        except ClosedError:
            with self._lock:
                self._n_waiting -= 1
            if state.sampler is not None and state.sampler is state.req.sampler:
                state.sampler._owner = None  # refused: the caller's again
            elif state.sampler is not None:
                state.sampler.close()  # made for the request
            raise
        self._inbox.append(("submit", state))
        self.wake.set()
        return state.id

    def cancel(self, rid: int) -> None:
        """End request ``rid`` (``finish_reason="cancelled"``) at the next step; unknown ids are ignored."""
        self._inbox.append(("cancel", rid))
        self.wake.set()

    @property
    def has_work(self) -> bool:
        """Whether ``step`` has anything to do."""
        return bool(self._inbox or self._queue or self._order)

    # -- the owner -------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit, decode one batch, sample: the events of this step (possibly none)."""
        if self._closed or self._error is not None:
            self._check_open()
        t0 = time.perf_counter()
        events: list[Event] = []
        ctx = self.ctx
        with ctx.hold(self):  # claimed since __init__: ClosedError once the context is closed
            if self._inbox:
                self._take_inbox(events)
            if self._n_deadlines:
                self._expire(t0, events)
            if self._queue:
                self._admit(t0)
            st = self._stepper
            while self._order:
                st.build(self._order, self.prefill_budget, self._finish_length, events)
                if st.n_rows == 0:
                    break
                try:
                    self._t_decode += st.decode()
                except KVCacheFullError as e:
                    if not self._make_room(e, events):
                        break
                    continue
                except AbortedError:
                    if ctx.closing:  # close() from another thread aborted it: the engine goes with its context
                        self._fail(ClosedError("the engine's context was closed"), events)
                    else:  # ctx.abort(), or an abort callback that said so
                        self._end_all("cancelled", None, events)
                    break
                except Exception as e:  # a failed decode, a lost RPC server, an abort callback that raised
                    self._end_all("error", e, events)
                    break
                self._n_decoded += st.n_rows
                st.collect(time.perf_counter(), events)
                break
            for s in [s for s in self._order if s.reason is not None]:
                self._end(s, s.reason or "error", events, drop=s.error is not None)
        self._n_steps += 1
        self._t_steps += time.perf_counter() - t0
        return events

    def run(self) -> list[Event]:
        """Step until there is no work: every event, in order (for scripts and tests)."""
        events: list[Event] = []
        while self.has_work:
            events += self.step()
        return events

    def metrics(self) -> EngineMetrics:
        n = max(self._n_steps, 1)
        return EngineMetrics(self._n_steps, self._t_steps, self._t_decode, self._n_decoded, self._n_decoded / n,
                             len(self._order), len(self._queue) + len(self._inbox),
                             sum(len(self.ctx.tokens.view(i)) for i in range(self.n_slots)), self._n_preempted,
                             self._draft.seconds if self._draft is not None else 0.0)

    def _end_all(self, reason: str, error: BaseException | None, events: list[Event]) -> None:
        """End every running request with ``reason`` and ``error`` (its cells dropped)."""
        for s in list(self._order):
            s.error = error
            self._end(s, reason, events, drop=True)

    def _fail(self, error: BaseException, events: list[Event]) -> None:
        """The engine itself failed: every request, running or queued, ends with ``error``, and
        every later call raises ClosedError naming it (h11's ERROR state)."""
        self._error = error
        self._end_everything("error", error, events)

    def _end_everything(self, reason: str, error: BaseException | None, events: list[Event]) -> None:
        self._take_inbox(events)
        for s in list(self._order) + list(self._queue):
            s.error = error
            self._end(s, reason, events, drop=False)

    def close(self, error: BaseException | None = None) -> list[Event]:
        """End every request (``cancelled``, or ``error`` with ``error``: the engine failed) and free
        the context if the engine made it."""
        if self._closed:
            return []
        events: list[Event] = []
        if error is not None and self._error is None:
            self._error = error
        reason = "cancelled" if error is None else "error"
        try:
            with self.ctx.hold(self):  # BusyError while another thread steps it
                self._end_everything(reason, error, events)
        except ClosedError:  # the context is gone: nothing to tidy in its cache, the requests still end
            self._end_everything(reason, error, events)
        self._queue.clear()
        self._closed = True
        if not self.ctx.closed:
            self.ctx.release(self)
        if self._own:
            self.ctx.close()
        if self._draft is not None:
            self._draft.close()
        return events

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside a step ----------------------------------------------------------------------------
    def _take_inbox(self, events: list[Event]) -> None:
        inbox = self._inbox
        while inbox:
            kind, x = inbox.popleft()
            if kind == "submit":
                self._queue.append(x)
                self._n_deadlines += x.deadline is not None
                continue
            for s in itertools.chain(self._order, self._queue):
                if s.id == x:
                    s.cancelled = True
                    self._end(s, "cancelled", events, drop=False)
                    break

    def _expire(self, now: float, events: list[Event]) -> None:
        for s in [s for s in itertools.chain(self._order, self._queue) if s.deadline is not None and now >= s.deadline]:
            self._end(s, "deadline", events, drop=False)

    def _admit(self, now: float) -> None:
        if self._full:  # after a pre-emption nothing joins until a request has left
            return
        free = [i for i, r in enumerate(self.slots) if r is None]
        while self._queue and free:
            s = self._queue.popleft()
            with self._lock:
                self._n_waiting -= 1
            slot, keep, donor, n = place(self.ctx, s, self.slots, free, self.last_used, self._share)
            free.remove(slot)
            self._seat(s, slot, keep, donor, n, now)

    def _seat(self, s: RequestState, slot: int, keep: int, donor: int, n: int, now: float) -> None:
        ctx = self.ctx
        mem = ctx.memory
        if keep > 0 and mem.seq_rm(slot, keep, -1):
            hist = ctx.tokens.view(slot)
            del hist[keep:]
            s.hist = hist
        else:
            keep = 0
            mem.seq_rm(slot, -1, -1)
            s.hist = []
        ctx.tokens.bind(slot, s.hist)
        s.slot, s.n_pos = slot, keep
        self.slots[slot] = s
        self._order.append(s)
        if not s.t_admit:
            s.t_admit = now
            s.n_cached = keep
        if donor >= 0:
            d = self.slots[donor]
            if d is not None and d.prefilling and d.n_pos < n:
                s.wait = (d, n)  # copied once the donor has decoded that far (see _ready)
            else:
                self.copy_from(s, donor, n)

    def _ready(self, s: RequestState) -> bool:
        """Whether a request waiting for a donor's prefix may prefill now (copying it first)."""
        assert s.wait is not None
        d, n = s.wait
        if d.reason is None and d.slot >= 0 and d.prefilling and d.n_pos < n:
            return False
        s.wait = None
        if d.slot >= 0:
            self.copy_from(s, d.slot, n)
        return True

    def copy_from(self, s: RequestState, donor: int, n: int) -> None:
        """Give ``s`` the first ``n`` positions of slot ``donor`` (if it still holds them)."""
        if n > s.n_pos and copy_prefix(self.ctx, donor, s.slot, n):
            s.hist = self.ctx.tokens.view(donor)[:n]
            self.ctx.tokens.bind(s.slot, s.hist)
            s.n_pos = n
            if not s.n_preempted:
                s.n_cached = n

    def _finish_length(self, s: RequestState) -> bool:
        """``s`` reached the end of its sequence's room: shift it (True) or end it with ``length``."""
        if s.req.context_shift and shift(self.ctx, s):
            return True
        s.reason = "length"
        return False

    def _make_room(self, error: KVCacheFullError, events: list[Event]) -> bool:
        """The batch found no room in the KV cache: drop an idle slot's cached tokens, else pre-empt
        the newest running request (re-queued first, its output so far kept)."""
        ctx = self.ctx
        waited = {s.wait[0].slot for s in self._order if s.wait is not None}
        idle = [i for i, r in enumerate(self.slots) if r is None and ctx.tokens.view(i) and i not in waited]
        if not idle:
            idle = [i for i, r in enumerate(self.slots) if r is None and ctx.memory.seq_pos_max(i) >= 0]
        if idle:
            i = min(idle, key=lambda j: self.last_used[j])
            ctx.memory.seq_rm(i, -1, -1)
            return True
        if len(self._order) < 2:
            for s in list(self._order):
                s.error = error
                self._end(s, "error", events, drop=True)
            return False
        victim = self._order[-1]
        self._order.pop()
        ctx.memory.seq_rm(victim.slot, -1, -1)
        self.slots[victim.slot] = None
        self._n_preempted += 1
        victim.n_preempted += 1
        if victim.pending >= 0:  # re-decode the prompt and the output so far, then go on sampling
            victim.tokens = np.concatenate([victim.tokens[:victim.n_prompt], np.asarray(victim.out, np.int32)])
            victim.pending = -1
        victim.slot, victim.n_pos, victim.hist, victim.wait = -1, 0, [], None
        for s in self._order:
            if s.wait is not None and s.wait[0] is victim:
                s.wait = None
        self._queue.appendleft(victim)
        self._full = True
        with self._lock:
            self._n_waiting += 1
        return True

    def _end(self, s: RequestState, reason: str, events: list[Event], drop: bool) -> None:
        """Finish ``s``: its last text, its DoneEvent, its slot freed (its cache kept for reuse)."""
        ctx = self.ctx
        if s in self._order:
            self._order.remove(s)
        elif s in self._queue:
            self._queue.remove(s)
            with self._lock:
                self._n_waiting -= 1
        if s.slot >= 0:
            self._full = False
            if (drop or s.shifted) and not ctx.closed:
                ctx.memory.seq_rm(s.slot, s.n_pos if not s.shifted else -1, -1)
            self.slots[s.slot] = None
            self.last_used[s.slot] = time.perf_counter()
        for r in self._order:
            if r.wait is not None and r.wait[0] is s:
                d, n = r.wait
                r.wait = None
                if not ctx.closed:
                    self.copy_from(r, s.slot, n)
        s.reason = finish(s, reason, events)
        self._n_deadlines -= s.deadline is not None
        if s.sampler is not None:
            s.sampler.close()
        s.slot = -1
