"""Draft-model speculation: a second context, on a model whose vocabulary matches the engine's,
with the same slots (sequence ids) as the engine's context.

Before a step, every request that speculates this way brings its draft sequence up to the tokens
its own sequence holds plus its pending token (as llama-server keeps its draft context in step),
then the draft model proposes up to k tokens greedily, one ``llama_decode`` per drafted position
for all such requests together. The engine verifies the drafts in its own batch, as it verifies
n-gram drafts; whatever the target rejects is dropped here at the next sync.
"""

from __future__ import annotations

import time

import numpy as np

from ..batch import Batch
from ..context import Context
from ..errors import DecodeError, InvalidInputError, KVCacheFullError
from ..model import Model
from ..raw import ffi, lib
from .request import RequestState
from .slots import common_prefix

# llama.cpp's common/speculative.cpp: vocabularies may differ in size by this much, and token
# texts are compared from this id on (the first few are special tokens that often differ).
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


def incompatibility(target: Model, draft: Model) -> str | None:
    """Why ``draft`` cannot draft for ``target`` (None: it can), decided as llama.cpp's
    ``common_speculative_are_compatible`` decides: the same vocabulary type, the same bos/eos
    where they are added, sizes within 128 tokens, the same token texts from id 5 on."""
    vt, vd = target.vocab, draft.vocab
    if vt.type != vd.type:
        return f"vocabulary types differ ({vt.type} against {vd.type})"
    if vt.add_bos != vd.add_bos or (vt.add_bos and vt.bos != vd.bos):
        return f"bos tokens differ (added {vt.add_bos}/{vd.add_bos}, ids {vt.bos}/{vd.bos})"
    if vt.add_eos != vd.add_eos or (vt.add_eos and vt.eos != vd.eos):
        return f"eos tokens differ (added {vt.add_eos}/{vd.add_eos}, ids {vt.eos}/{vd.eos})"
    nt, nd = vt.n_tokens, vd.n_tokens
    if abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE:
        return f"vocabulary sizes {nt} and {nd} differ by more than {VOCAB_MAX_SIZE_DIFFERENCE}"
    text, pt, pd = lib.llama_vocab_get_text, vt.ptr, vd.ptr
    with target.hold(), draft.hold():
        for i in range(VOCAB_CHECK_START_TOKEN_ID, min(nt, nd)):
            a, b = ffi.string(text(pt, i)), ffi.string(text(pd, i))
            if a != b:
                return f"token {i} differs ({a!r} against {b!r})"
    return None


class DraftModel:
    """The draft context and what each of its slots holds; ``draft`` proposes tokens."""

    def __init__(self, ctx: Context, model: Model) -> None:
        if not isinstance(model, Model):
            raise InvalidInputError(f"draft_model must be a Model, not {type(model).__name__}")
        why = incompatibility(ctx.model, model)
        if why is not None:
            raise InvalidInputError(f"the draft model cannot draft for this model: {why}")
        if model.is_recurrent or model.is_hybrid or not model.has_decoder:
            raise InvalidInputError("a draft model needs a decoder whose memory can drop positions (not recurrent)")
        # the same slots and room; a sliding-window cache full-size, so that dropped drafts leave the window whole
        self.ctx = Context(model, n_ctx=ctx.n_ctx, n_batch=ctx.n_batch, n_ubatch=ctx.n_ubatch,
                           n_seq_max=ctx.n_seq_max, n_threads=ctx.n_threads,
                           n_threads_batch=lib.llama_n_threads_batch(ctx.ptr), kv_unified=True, swa_full=True)
        self.batch = Batch(self.ctx.n_batch, 1)
        self.n_vocab = min(ctx.n_vocab, self.ctx.n_vocab)  # a drafted id the target lacks ends the draft
        n = ctx.n_seq_max
        self.toks: list[list[int]] = [[] for _ in range(n)]  # the tokens each draft sequence holds
        self.owner: list[tuple[RequestState, list[int]] | None] = [None] * n  # (request, its hist) followed
        self.valid = [0] * n  # toks[:valid] is known to equal the owner's hist[:valid]
        self.seconds = 0.0    # time spent in the draft model's llama_decode

    def close(self) -> None:
        self.ctx.close()

    # -- keeping in step ---------------------------------------------------------------------------
    def _rm(self, slot: int, p0: int) -> None:
        lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx.ptr), slot, p0, -1)
        del self.toks[slot][p0:]

    def _sync(self, s: RequestState) -> int:
        """Drop what slot ``s.slot`` holds beyond ``s.hist``; the length of what it keeps. A request
        new to the slot first takes the longest prefix any other draft sequence holds (shared cells)."""
        slot, hist, toks = s.slot, s.hist, self.toks[s.slot]
        owner = self.owner[slot]
        if owner is None or owner[0] is not s or owner[1] is not hist:
            c = common_prefix(np.asarray(toks, np.int32), hist)
            self.owner[slot] = (s, hist)
            best, donor = c, -1
            for j, other in enumerate(self.toks):
                if j != slot and len(other) > best:
                    n = common_prefix(np.asarray(other, np.int32), hist)
                    if n > best:
                        best, donor = n, j
            if donor >= 0:
                mem = lib.llama_get_memory(self.ctx.ptr)
                lib.llama_memory_seq_rm(mem, slot, -1, -1)
                lib.llama_memory_seq_cp(mem, donor, slot, 0, best)
                self.toks[slot] = toks = self.toks[donor][:best]
                c = best
        else:
            c, m = self.valid[slot], min(len(toks), len(hist))
            while c < m and toks[c] == hist[c]:
                c += 1
        if len(toks) > c:
            self._rm(slot, c)
        self.valid[slot] = c
        return c

    def _decode(self, n: int, firsts: dict[int, int], busy: set[int]) -> bool:
        """Decode the first ``n`` rows. On failure drop each slot's rows (from ``firsts[slot]`` on)
        and, where the cache was full, the sequences of idle slots: drafting resumes next step."""
        self.batch.n_tokens = n
        t = time.perf_counter()
        try:
            self.ctx.run(self.batch)
            return True
        except (KVCacheFullError, DecodeError) as e:
            for slot, p0 in firsts.items():
                self._rm(slot, p0)
            if isinstance(e, KVCacheFullError):
                for j in range(len(self.toks)):
                    if j not in busy:
                        self.forget(j)
            return False
        finally:
            self.seconds += time.perf_counter() - t

    def _picks(self, n_out: int) -> list[int]:
        nv = self.ctx.n_vocab
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits(self.ctx.ptr), 4 * n_out * nv), dtype=np.float32)
        return logits.reshape(n_out, nv).argmax(axis=1).tolist()

    # -- drafting ----------------------------------------------------------------------------------
    def draft(self, asks: list[tuple[RequestState, int]], busy: set[int]) -> list[list[int]]:
        """Up to ``k`` greedy draft tokens for each (request, k) in ``asks`` (generating requests);
        an empty list where there is none this step (no room left to catch up, a failed decode)."""
        b, cap = self.batch, self.ctx.n_batch
        out: list[list[int]] = [[] for _ in asks]
        r = 0
        going: list[tuple[int, int, int]] = []  # (index in asks, k, output row)
        firsts: dict[int, int] = {}
        for i, (s, k) in enumerate(asks):
            slot = s.slot
            c = self._sync(s)
            hist, toks = s.hist, self.toks[slot]
            take = min(len(hist) - c, cap - r)
            if take < 0 or (take == 0 and r >= cap):
                continue
            firsts[slot] = c
            b.token[r:r + take] = hist[c:c + take]
            b.pos[r:r + take] = np.arange(c, c + take)
            b.seq_id[r:r + take, 0] = slot
            b.logits[r:r + take] = 0
            toks.extend(hist[c:c + take])
            r += take
            if c + take < len(hist) or r >= cap:
                continue  # caught up part of the way: it drafts at a later step
            b.token[r], b.pos[r], b.seq_id[r, 0], b.logits[r] = s.pending, len(hist), slot, 1
            toks.append(s.pending)
            going.append((i, k, r))
            r += 1
        if not r or not self._decode(r, firsts, busy) or not going:
            return out
        while going:
            picks = self._picks(len(going))
            r, nxt = 0, []
            firsts = {}
            for (i, k, _), t in zip(going, picks):
                s = asks[i][0]
                if t >= self.n_vocab:
                    continue
                d = out[i]
                d.append(t)
                if len(d) >= k:
                    continue
                pos = len(self.toks[s.slot])
                firsts[s.slot] = pos
                b.token[r], b.pos[r], b.seq_id[r, 0], b.logits[r] = t, pos, s.slot, 1
                self.toks[s.slot].append(t)
                nxt.append((i, k, r))
                r += 1
            going = nxt
            if r and not self._decode(r, firsts, busy):
                break
        return out

    def forget(self, slot: int) -> None:
        """Empty a slot's draft sequence."""
        self._rm(slot, 0)
        self.owner[slot] = None
        self.valid[slot] = 0
