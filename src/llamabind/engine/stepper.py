"""One engine step's batch: laid out, decoded, and turned into tokens and events.

Rows, in order: one per plainly generating request, then each drafting request's pending token
and draft, then prompt chunks. Every generating row asks for logits, so the output matrix's
first rows are theirs and the greedy ones are sampled together, as one numpy arg-max.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..batch import Batch
from ..context import Context
from ..generation.events import TokenEvent
from ..generation.logprobs import logprob_of
from ..raw import ffi, lib
from ..sampler import sample_fast
from .draft import DraftModel
from .request import RequestState


class Step:
    """Builds, decodes and collects one batch for the engine (which owns the context)."""

    def __init__(self, ctx: Context, batch: Batch) -> None:
        self.ctx, self.batch = ctx, batch
        self.n_rows = 0
        self.plain: list[RequestState] = []
        self.n_greedy = 0  # how many of ``plain`` are greedy
        self.drafted: list[tuple[RequestState, int, list[int]]] = []   # (request, first row, draft)
        self.prefill: list[tuple[RequestState, int, int, int]] = []    # (request, n tokens, row, output) or row -1
        self.swa = ctx.model.n_swa > 0
        self.ready: Callable[[RequestState], bool] = lambda s: True   # a waiting request's prefix is in place
        self.model: DraftModel | None = None  # the engine's draft model, if any
        # the batch's arrays, once (n_seq_id stays 1 everywhere: every row is in one sequence)
        self._token, self._pos, self._seq, self._logits = batch.token, batch.pos, batch.seq_id[:, 0], batch.logits

    def build(self, order: list[RequestState], budget: int, at_end: Callable[[RequestState], bool],
              events: list) -> None:
        """Lay out the batch for the running requests ``order`` (admission order)."""
        ctx = self.ctx
        token, pos, seq, logits = self._token, self._pos, self._seq, self._logits
        n_ctx = ctx.n_ctx_seq
        cap = ctx.n_batch
        plain: list[RequestState] = []
        pre: list[RequestState] = []  # in prefill
        drafts: list[tuple[RequestState, list[int]]] = []
        asks: list[tuple[RequestState, int]] = []  # for the draft model
        for s in order:
            if s.pending < 0:
                if s.reason is None:
                    pre.append(s)
                continue
            if s.reason is not None or (s.n_pos >= n_ctx and not at_end(s)):
                continue
            if s.spec and (s.drafter is not None or not s.shifted):
                k = min(s.req.n_draft, n_ctx - s.n_pos - 1, s.max_tokens - len(s.out) - 1)
                if k > 0 and s.drafter is None:
                    asks.append((s, k))
                    continue
                d = s.drafter.draft(k) if k > 0 and s.drafter is not None else []
                if d:
                    drafts.append((s, d))
                    continue
            plain.append(s)
        if asks:
            got = self._drafts(asks, order)
            for (s, _), d in zip(asks, got):
                if d:
                    drafts.append((s, d))
                elif s.reason is None:
                    plain.append(s)
        rows = len(plain) + sum(len(d) + 1 for _, d in drafts)
        # Drafts ride only where they fit; on a sliding-window cache the whole batch must be one
        # ubatch, so that no window cell a rejected draft would need back is overwritten.
        if drafts and (rows > cap or (self.swa and rows > ctx.n_ubatch)):
            plain += [s for s, _ in drafts]
            drafts = []
            rows = len(plain)
        n = len(plain)
        if n:
            token[:n] = [s.pending for s in plain]
            pos[:n] = [s.n_pos for s in plain]
            seq[:n] = [s.slot for s in plain]
            logits[:n] = 1
        r = n
        self.drafted = []
        for s, d in drafts:
            k = len(d) + 1
            token[r] = s.pending
            token[r + 1:r + k] = d
            pos[r:r + k] = np.arange(s.n_pos, s.n_pos + k)
            seq[r:r + k] = s.slot
            logits[r:r + k] = 1
            self.drafted.append((s, r, d))
            r += k
        room = cap - r
        if r:
            room = min(room, budget)
            if self.swa and drafts:
                room = min(room, ctx.n_ubatch - r)
        out = r
        self.prefill = []
        now = 0.0
        for s in pre:
            if room <= 0:
                break
            if s.wait is not None and not self.ready(s):
                continue
            take = min(room, int(s.tokens.size) - s.n_pos)
            if take <= 0:
                continue
            last = s.n_pos + take == s.tokens.size
            token[r:r + take] = s.tokens[s.n_pos:s.n_pos + take]
            pos[r:r + take] = np.arange(s.n_pos, s.n_pos + take)
            seq[r:r + take] = s.slot
            logits[r:r + take] = 0
            if last:
                logits[r + take - 1] = 1
            if not s.t_prefill:
                s.t_prefill = now = now or time.perf_counter()
            self.prefill.append((s, take, r + take - 1 if last else -1, out))
            out += last
            r += take
            room -= take
        self.plain = plain
        self.n_greedy = sum(s.greedy for s in plain)
        self.batch.n_tokens = r
        self.n_rows = r

    def _drafts(self, asks: list[tuple[RequestState, int]], order: list[RequestState]) -> list[list[int]]:
        """The draft model's proposals; if it fails (say, its RPC server was lost), the requests
        that asked end with its error and the others go on."""
        if self.model is None:
            return [[] for _ in asks]
        try:
            return self.model.draft(asks, {r.slot for r in order})
        except Exception as e:
            for s, _ in asks:
                s.error, s.reason = e, "error"
            return [[] for _ in asks]

    def decode(self) -> float:
        """Run the batch; seconds spent in llama_decode (the GIL is released meanwhile)."""
        t = time.perf_counter()
        self.ctx.run(self.batch, all_outputs=not self.prefill)  # no prompt chunk: every row has logits
        return time.perf_counter() - t

    def collect(self, now: float, events: list) -> None:
        """Sample every request that has logits in this batch and emit its tokens.

        Everything the engine itself reads from llama.cpp's logits (greedy picks, logprobs; rows
        copied where a request's own sampler decides the token) is read first, before any user
        sampler runs: after that the buffer is only read by llama.cpp's samplers.
        """
        ctx = self.ctx
        nv = ctx.n_vocab
        n_out = ctx.n_outputs
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits(ctx.ptr), 4 * n_out * nv),
                               dtype=np.float32).reshape(n_out, nv)
        plain = self.plain
        n = len(plain)
        if n == self.n_greedy and n:  # all greedy: one arg-max, and nothing else needs a row number
            toks = logits[:n].argmax(axis=1).tolist()
            for r, s, tok in zip(range(n), plain, toks):
                s.hist.append(s.pending)
                s.n_pos += 1
                emit(s, tok, logprob_of(logits[r], tok, s.top_n) if s.top_n >= 0 else None, now, events)
            if not self.drafted and not self.prefill:
                return
            ready: list = []
        else:
            ready = [self._read(s, r, r, logits) for r, s in enumerate(plain)]
        drafts = [(s, r0, d, self._read_draft(s, r0, d, logits)) for s, r0, d in self.drafted]
        prefills = [(s, take, row, self._read(s, row, o, logits) if row >= 0 else None)
                    for s, take, row, o in self.prefill]
        # from here on, llama.cpp's buffer is read only by the requests' own samplers
        for s, got in zip(plain, ready):
            s.hist.append(s.pending)
            s.n_pos += 1
            self._emit_read(s, got, now, events)
        for s, r0, d, got in drafts:
            self._verify(s, r0, d, got, now, events)
        for s, take, row, got in prefills:
            s.hist.extend(s.tokens[s.n_pos:s.n_pos + take].tolist())
            s.n_pos += take
            if got is not None:
                s.t_prefill_end = now
                self._emit_read(s, got, now, events)

    @staticmethod
    def _read(s: RequestState, row: int, out: int, logits: np.ndarray) -> tuple:
        """What request ``s`` needs of output ``out`` (batch row ``row``): a greedy pick and its
        logprob, or the row to sample from and a copy for logprobs."""
        if s.greedy:
            tok = int(logits[out].argmax())
            return row, tok, logprob_of(logits[out], tok, s.top_n) if s.top_n >= 0 else None
        return row, -1, logits[out].copy() if s.top_n >= 0 else None

    def _emit_read(self, s: RequestState, got: tuple, now: float, events: list) -> None:
        row, tok, lp = got
        if tok < 0:
            tok = self._sample(s, row)
            if tok < 0:
                return
            lp = logprob_of(lp, tok, s.top_n) if lp is not None else None
        emit(s, tok, lp, now, events)

    @staticmethod
    def _read_draft(s: RequestState, r0: int, d: list[int], logits: np.ndarray) -> tuple:
        """A drafted request's rows: the greedy picks up to the first disagreement with their
        logprobs, or (for its own sampler) copies of the rows for logprobs."""
        k = len(d)
        if s.greedy:
            toks: list[int] = []
            for j, t in enumerate(logits[r0:r0 + k + 1].argmax(axis=1).tolist()):
                toks.append(t)
                if j == k or t != d[j]:
                    break
            lps = [logprob_of(logits[r0 + j], t, s.top_n) for j, t in enumerate(toks)] if s.top_n >= 0 else None
            return toks, lps
        return None, logits[r0:r0 + k + 1].copy() if s.top_n >= 0 else None

    def _sample(self, s: RequestState, row: int) -> int:
        """A request's own sampler on batch row ``row``; an exception ends that request only."""
        try:
            return sample_fast(s.sampler, self.ctx, row)  # type: ignore[arg-type]
        except Exception as e:  # a user's Python sampler, a grammar that rejects everything
            s.error, s.reason = e, "error"
            return -1

    def _verify(self, s: RequestState, r0: int, d: list[int], got: tuple, now: float, events: list) -> None:
        """Accept the longest run of draft tokens that sampling agrees with, plus one sampled token;
        drop the rest from the KV cache."""
        k = len(d)
        toks, rows = got
        if toks is not None:
            lps = rows
        else:
            toks = []
            for j in range(k + 1):
                t = self._sample(s, r0 + j)
                if t < 0:
                    break
                toks.append(t)
                if j == k or t != d[j]:
                    break
            lps = [logprob_of(rows[j], t, s.top_n) for j, t in enumerate(toks)] if rows is not None else None
        m = max(len(toks) - 1, 0)
        s.n_drafted += k
        s.n_accepted += m
        s.hist.append(s.pending)
        s.hist.extend(d[:m])
        s.n_pos += m + 1
        if m < k:
            lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx.ptr), s.slot, s.n_pos, -1)
        for j, t in enumerate(toks):
            if not emit(s, t, lps[j] if lps is not None else None, now, events):
                break


def emit(s: RequestState, tok: int, lp, now: float, events: list) -> bool:
    """Add a sampled token to ``s``: text, stop strings, limits, parse; False once it ended."""
    if not s.t_first:
        s.t_first = now
    detok = s.detok
    piece, eog = detok.entry(tok)
    if eog and not s.ignore_eog:
        s.reason = "stop"
        return False
    out = s.out
    out.append(tok)
    s.t_tokens.append(now)
    text = detok.feed_piece(piece)
    if s.simple:  # no n-gram index, stop strings or chat parse
        if text:
            s.text.append(text)
        if len(out) >= s.max_tokens:
            s.reason = "length"
        else:
            s.pending = tok
        events.append(TokenEvent(tok, text, s.id, (), lp, now))
        return s.reason is None
    if s.drafter is not None:
        s.drafter.extend([tok])
    if s.stop.stops:
        text, hit = s.stop.push(text)
        if hit:
            s.reason, s.hit = "stop", True
    if text:
        s.text.append(text)
    if s.reason is None:
        if len(out) >= s.max_tokens:
            s.reason = "length"
        else:
            s.pending = tok
    if s.parser is not None and text:
        events.append(TokenEvent(tok, text, s.id, s.parser.feed(text), lp, now))
    else:
        events.append(TokenEvent(tok, text, s.id, (), lp, now))
    return s.reason is None
