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
from .request import RequestState


class Step:
    """Builds, decodes and collects one batch for the engine (which owns the context)."""

    def __init__(self, ctx: Context, batch: Batch) -> None:
        self.ctx, self.batch = ctx, batch
        self.n_rows = 0
        self.plain: list[RequestState] = []
        self.drafted: list[tuple[RequestState, int, list[int]]] = []   # (request, first row, draft)
        self.prefill: list[tuple[RequestState, int, int, int]] = []    # (request, n tokens, row, output) or row -1
        self.swa = ctx.model.n_swa > 0
        self.ready: Callable[[RequestState], bool] = lambda s: True   # a waiting request's prefix is in place

    def build(self, order: list[RequestState], budget: int, at_end: Callable[[RequestState], bool],
              events: list) -> None:
        """Lay out the batch for the running requests ``order`` (admission order)."""
        ctx, b = self.ctx, self.batch
        n_ctx = ctx.n_ctx_seq
        cap = ctx.n_batch
        plain: list[RequestState] = []
        drafts: list[tuple[RequestState, list[int]]] = []
        for s in order:
            if s.pending < 0 or s.reason is not None:
                continue
            if s.n_pos + 1 > n_ctx and not at_end(s):
                continue
            if s.drafter is not None:
                k = min(s.req.n_draft, n_ctx - s.n_pos - 1, s.req.max_tokens - len(s.out) - 1)
                d = s.drafter.draft(k) if k > 0 else []
                if d:
                    drafts.append((s, d))
                    continue
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
            b.token[:n] = [s.pending for s in plain]
            b.pos[:n] = [s.n_pos for s in plain]
            b.seq_id[:n, 0] = [s.slot for s in plain]
            b.n_seq_id[:n] = 1
            b.logits[:n] = 1
        r = n
        self.drafted = []
        for s, d in drafts:
            k = len(d) + 1
            b.token[r] = s.pending
            b.token[r + 1:r + k] = d
            b.pos[r:r + k] = np.arange(s.n_pos, s.n_pos + k)
            b.seq_id[r:r + k, 0] = s.slot
            b.n_seq_id[r:r + k] = 1
            b.logits[r:r + k] = 1
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
        for s in order:
            if room <= 0:
                break
            if not s.prefilling or (s.wait is not None and not self.ready(s)):
                continue
            take = min(room, int(s.tokens.size) - s.n_pos)
            if take <= 0:
                continue
            last = s.n_pos + take == s.tokens.size
            b.token[r:r + take] = s.tokens[s.n_pos:s.n_pos + take]
            b.pos[r:r + take] = np.arange(s.n_pos, s.n_pos + take)
            b.seq_id[r:r + take, 0] = s.slot
            b.n_seq_id[r:r + take] = 1
            b.logits[r:r + take] = 0
            if last:
                b.logits[r + take - 1] = 1
            if not s.t_prefill:
                s.t_prefill = now = now or time.perf_counter()
            self.prefill.append((s, take, r + take - 1 if last else -1, out))
            out += last
            r += take
            room -= take
        self.plain = plain
        b.n_tokens = r
        self.n_rows = r

    def decode(self) -> float:
        """Run the batch; seconds spent in llama_decode (the GIL is released meanwhile)."""
        t = time.perf_counter()
        self.ctx.run(self.batch, all_outputs=not self.prefill)  # no prompt chunk: every row has logits
        return time.perf_counter() - t

    def collect(self, now: float, events: list) -> None:
        """Sample every request that has logits in this batch and emit its tokens."""
        ctx = self.ctx
        nv = ctx.n_vocab
        n_out = ctx.n_outputs
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits(ctx.ptr), 4 * n_out * nv),
                               dtype=np.float32).reshape(n_out, nv)
        plain = self.plain
        n = len(plain)
        if n:
            greedy = [r for r, s in enumerate(plain) if s.greedy]
            if len(greedy) == n:
                toks = logits[:n].argmax(axis=1).tolist()
            else:
                toks = [0] * n
                for r in greedy:
                    toks[r] = int(logits[r].argmax())
            for r, s in enumerate(plain):
                s.hist.append(s.pending)
                s.n_pos += 1
                tok = toks[r] if s.greedy else self._sample(s, r)
                if tok >= 0:
                    emit(s, tok, logprob_of(logits[r], tok, s.top_n) if s.top_n >= 0 else None, now, events)
        for s, r0, d in self.drafted:
            self._verify(s, r0, d, logits, now, events)
        for s, take, row, o in self.prefill:
            s.hist.extend(s.tokens[s.n_pos:s.n_pos + take].tolist())
            s.n_pos += take
            if row < 0:
                continue
            s.t_prefill_end = now
            tok = int(logits[o].argmax()) if s.greedy else self._sample(s, row)
            if tok >= 0:
                emit(s, tok, logprob_of(logits[o], tok, s.top_n) if s.top_n >= 0 else None, now, events)

    def _sample(self, s: RequestState, row: int) -> int:
        """A request's own sampler on batch row ``row``; an exception ends that request only."""
        try:
            return sample_fast(s.sampler, self.ctx.ptr, row, self.ctx.n_vocab)  # type: ignore[arg-type]
        except Exception as e:  # a user's Python sampler, a grammar that rejects everything
            s.error, s.reason = e, "error"
            return -1

    def _verify(self, s: RequestState, r0: int, d: list[int], logits: np.ndarray, now: float, events: list) -> None:
        """Accept the longest run of draft tokens that sampling agrees with, plus one sampled token;
        drop the rest from the KV cache."""
        k = len(d)
        if s.greedy:
            picks = logits[r0:r0 + k + 1].argmax(axis=1).tolist()
            toks = []
            for j, t in enumerate(picks):
                toks.append(t)
                if j == k or t != d[j]:
                    break
        else:
            toks = []
            for j in range(k + 1):
                t = self._sample(s, r0 + j)
                if t < 0:
                    break
                toks.append(t)
                if j == k or t != d[j]:
                    break
        m = max(len(toks) - 1, 0)
        s.n_drafted += k
        s.n_accepted += m
        s.hist.append(s.pending)
        s.hist.extend(d[:m])
        s.n_pos += m + 1
        if m < k:
            lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx.ptr), s.slot, s.n_pos, -1)
        for j, t in enumerate(toks):
            lp = logprob_of(logits[r0 + j], t, s.top_n) if s.top_n >= 0 else None
            if not emit(s, t, lp, now, events):
                break


def emit(s: RequestState, tok: int, lp, now: float, events: list) -> bool:
    """Add a sampled token to ``s``: text, stop strings, limits, parse; False once it ended."""
    if not s.t_first:
        s.t_first = now
    piece, eog = s.detok.entry(tok)
    if eog and not s.req.ignore_eog:
        s.reason = "stop"
        return False
    s.out.append(tok)
    s.t_tokens.append(now)
    if s.drafter is not None:
        s.drafter.extend([tok])
    text = s.detok.feed_piece(piece)
    if s.stop.stops:
        text, hit = s.stop.push(text)
        if hit:
            s.reason, s.hit = "stop", True
    if text:
        s.text.append(text)
    if s.reason is None:
        if len(s.out) >= s.req.max_tokens:
            s.reason = "length"
        else:
            s.pending = tok
    if s.parser is not None and text:
        events.append(TokenEvent(tok, text, s.id, s.parser.feed(text), lp, now))
    else:
        events.append(TokenEvent(tok, text, s.id, (), lp, now))
    return s.reason is None
