"""Evaluating chunks into a context: media encoded, everything decoded, checked first."""

from __future__ import annotations

from ..context import Context
from ..errors import (
    ContextOverflowError,
    InvalidInputError,
    MtmdError,
)
from ..generation import Cancel
from ..raw import check_decode, clear_errors, ffi, lib, reason
from .chunks import Chunks
from .types import ChunkType

# -- evaluation -------------------------------------------------------------------------------

def _check_eval(ctx: Context, chunks: Chunks, n_past: int, seq_id: int, n_batch: int) -> None:
    mctx = chunks.mctx
    if mctx.closed:
        raise InvalidInputError("the MtmdContext of these chunks is closed")
    if mctx.model is not ctx.model:
        raise InvalidInputError("the chunks were made by an MtmdContext of another model")
    ctx.check_seq(seq_id)
    if n_past < 0:
        raise InvalidInputError(f"n_past must be >= 0, not {n_past}")
    if not 1 <= n_batch <= ctx.n_batch:
        raise InvalidInputError(f"n_batch must be in [1, {ctx.n_batch}] (the context's n_batch), not {n_batch}")
    if n_past + chunks.n_pos > ctx.n_ctx_seq:
        raise ContextOverflowError(f"the chunks take {chunks.n_pos} positions from n_past={n_past}; the context "
                                   f"holds {ctx.n_ctx_seq} per sequence (raise n_ctx or shorten the input)")
    for i, c in enumerate(chunks):
        if c.type == ChunkType.TEXT or not mctx.uses_non_causal(c):
            continue
        # llama.cpp aborts (GGML_ASSERT) on non-causal batches larger than n_ubatch.
        n = c.n_tokens
        if n > ctx.n_ubatch or n > n_batch:
            raise InvalidInputError(
                f"chunk {i} ({c.type.name.lower()}, {n} tokens) is decoded with non-causal attention and must fit "
                f"in one batch: it needs n_ubatch and n_batch >= {n} (context n_ubatch={ctx.n_ubatch}, "
                f"n_batch={n_batch}); raise them or lower image_max_tokens")


def eval_chunks(ctx: Context, chunks: Chunks, n_past: int = 0, seq_id: int = 0, n_batch: int | None = None,
                logits_last: bool = True, *, cancel: Cancel | None = None) -> int:
    """Encode the media and decode all ``chunks`` into sequence ``seq_id`` from position ``n_past``.

    Positions from ``n_past`` on are removed from the sequence first. Returns the new
    ``n_past``; with ``logits_last`` the last position has logits, so
    ``llamabind.generate_after(ctx, new_n_past)`` continues from there. ``n_batch`` (default:
    the context's) bounds each decode. ``cancel`` (or ``ctx.abort()``) stops it between graph
    nodes: AbortedError, and the sequence is left as it was up to ``n_past``. The GIL is
    released while libmtmd and llama.cpp work.
    """
    n_batch = ctx.n_batch if n_batch is None else int(n_batch)
    _check_eval(ctx, chunks, n_past, seq_id, n_batch)
    with ctx.lease() as lease, ctx.hold(lease):  # a generation running on this context is refused (BusyError)
        return _eval(ctx, chunks, n_past, seq_id, n_batch, logits_last, cancel)


def _eval(ctx: Context, chunks: Chunks, n_past: int, seq_id: int, n_batch: int, logits_last: bool,
          cancel: Cancel | None) -> int:
    """eval_chunks' work, for a caller that holds the context (checked, acquired)."""
    mctx = chunks.mctx
    new_n_past = ffi.new("llama_pos *", n_past)
    ctx.memory.seq_rm(seq_id, n_past, -1)
    clear_errors()
    with ctx.hold(), mctx._lock:
        cptr = ctx.ptr
        ctx.abort_flag_clear()
        if cancel is not None:
            ctx.use_abort_flag(cancel.flag)
        ctx._gate.in_c = True
        try:
            rc = lib.mtmd_helper_eval_chunks(mctx.ptr, cptr, chunks.ptr, n_past, seq_id, n_batch,
                                             bool(logits_last), new_n_past)
        finally:
            ctx._gate.in_c = False
            if cancel is not None:
                ctx.restore_abort()
        ctx.check_remote()
    if rc != 0:
        why = reason("")
        ctx.memory.seq_rm(seq_id, n_past, -1)  # drop whatever the failed evaluation wrote
        if "failed to encode" in why:
            raise MtmdError(f"libmtmd could not encode the media: {why}")
        check_decode(rc, "mtmd_helper_eval_chunks", why)
    ctx.set_outputs(1 if logits_last else 0)
    return int(new_n_past[0])
