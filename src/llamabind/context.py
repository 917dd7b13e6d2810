"""An inference context (``llama_context``): decode/encode, logits and embeddings, memory, state."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import _params
from ._handle import Handle
from .batch import Batch
from .binding import ffi, lib, take_errors
from .errors import BusyError, InvalidInputError, LlamaError, ModelLoadError, check_decode
from .model import LoraAdapter, Model


@dataclass(frozen=True)
class PerfData:
    """llama.cpp's performance counters for a context (milliseconds and token counts)."""

    t_load_ms: float
    t_p_eval_ms: float
    t_eval_ms: float
    n_p_eval: int
    n_eval: int
    n_reused: int

    @property
    def prompt_tps(self) -> float:
        return 1e3 * self.n_p_eval / self.t_p_eval_ms if self.t_p_eval_ms > 0 else 0.0

    @property
    def eval_tps(self) -> float:
        return 1e3 * self.n_eval / self.t_eval_ms if self.t_eval_ms > 0 else 0.0


class _AbortHook:
    """A Python abort callback, called by llama.cpp between graph nodes; True aborts."""

    def __init__(self, fn: Callable[[], bool]) -> None:
        self.fn = fn
        self.handle = ffi.new_handle(self)


@ffi.def_extern()
def _llamabind_abort(data) -> bool:
    hook: _AbortHook = ffi.from_handle(data)
    try:
        return bool(hook.fn())
    except BaseException:
        return True


_ALIASES = {"pooling": "pooling_type", "flash_attn": "flash_attn_type", "attention": "attention_type"}


def _check_shape(p) -> None:
    """Refuse parameter combinations on which llama.cpp aborts instead of failing."""
    n_batch = p.n_batch if p.n_ctx == 0 else min(p.n_batch, p.n_ctx)
    n_outputs = p.n_outputs_max or n_batch
    if p.n_seq_max > n_outputs:
        raise InvalidInputError(f"n_seq_max={p.n_seq_max} exceeds the output slots ({n_outputs}): "
                                f"raise n_batch (or n_outputs_max) or lower n_seq_max")
    if p.embeddings and p.n_seq_max > 1 and min(p.n_ubatch, p.n_batch) % p.n_seq_max:
        raise InvalidInputError(f"with embeddings, n_ubatch ({min(p.n_ubatch, p.n_batch)}) must be a multiple "
                                f"of n_seq_max ({p.n_seq_max})")


class Context(Handle):
    """A llama.cpp context over a model: the KV cache, the compute buffers and the outputs.

    Keyword arguments set ``llama_context_params`` fields by name; enums take short names
    (``pooling="mean"``, ``flash_attn="enabled"`` or a bool, ``type_k="q8_0"``). ``n_threads``
    defaults to the number of CPUs. decode/encode are serialised by a lock, so one context
    used from two threads is never corrupted; a second generation on a busy context is refused.
    """

    def __init__(self, model: Model, *, n_ctx: int = 4096, n_batch: int = 2048, n_ubatch: int = 512,
                 n_seq_max: int = 1, n_threads: int | None = None, n_threads_batch: int | None = None,
                 embeddings: bool = False, **params: Any) -> None:
        threads = n_threads or os.cpu_count() or 4
        values = {"n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": min(n_ubatch, n_batch),
                  "n_seq_max": n_seq_max, "n_threads": threads,
                  "n_threads_batch": n_threads_batch or threads, "embeddings": embeddings,
                  "no_perf": False}
        for key, value in params.items():
            key = _ALIASES.get(key, key)
            if key == "flash_attn_type" and isinstance(value, bool):
                value = "enabled" if value else "disabled"
            values[key] = value
        cparams = lib.llama_context_default_params()
        _params.apply(cparams, "struct llama_context_params", values)
        _check_shape(cparams)
        self._abort_flag = ffi.new("int *")
        cparams.abort_callback = ffi.addressof(lib, "_llamabind_flag_abort")
        cparams.abort_callback_data = self._abort_flag
        take_errors()
        ptr = lib.llama_init_from_model(model.ptr, cparams)
        if ptr == ffi.NULL:
            raise ModelLoadError(f"could not create a context: {take_errors() or 'see the llamabind log'}")
        super().__init__(ptr, lib.llama_free, parent=model)
        self.model = model
        self.vocab = model.vocab
        self._lock = threading.Lock()
        self._busy = False
        self._abort_hook: _AbortHook | None = None
        self._n_outputs = 0
        self._out_rows: np.ndarray | None = None  # batch rows with outputs; None: every row
        self._history: dict[int, list[int]] = {}
        self.n_ctx: int = lib.llama_n_ctx(ptr)
        self.n_batch: int = lib.llama_n_batch(ptr)
        self.n_ubatch: int = lib.llama_n_ubatch(ptr)
        self.n_seq_max: int = lib.llama_n_seq_max(ptr)
        self.n_ctx_seq: int = lib.llama_n_ctx_seq(ptr)
        self.n_vocab: int = model.vocab.n_tokens
        self.embeddings_enabled = bool(embeddings)
        self.memory = Memory(self)

    # -- configuration -----------------------------------------------------------------------
    @property
    def pooling_type(self) -> int:
        return lib.llama_pooling_type(self.ptr)

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        lib.llama_set_n_threads(self.ptr, n_threads, n_threads_batch or n_threads)

    @property
    def n_threads(self) -> int:
        return lib.llama_n_threads(self.ptr)

    def set_embeddings(self, on: bool) -> None:
        """Switch embedding output on or off for later decodes."""
        lib.llama_set_embeddings(self.ptr, on)
        self.embeddings_enabled = bool(on)

    def set_causal_attn(self, causal: bool) -> None:
        lib.llama_set_causal_attn(self.ptr, causal)

    def set_loras(self, adapters: Mapping[LoraAdapter, float]) -> None:
        """Apply LoRA adapters with scales (an empty mapping removes all)."""
        items = list(adapters.items())
        for a, _ in items:
            if a.model is not self.model:
                raise InvalidInputError("LoRA adapter belongs to another model")
        ptrs = ffi.new("struct llama_adapter_lora *[]", [a.ptr for a, _ in items] or [ffi.NULL])
        scales = ffi.new("float[]", [float(s) for _, s in items] or [0.0])
        if lib.llama_set_adapters_lora(self.ptr, ptrs, len(items), scales) != 0:
            raise LlamaError(f"llama_set_adapters_lora failed: {take_errors()}")

    # -- abort -------------------------------------------------------------------------------
    def set_abort_callback(self, fn: Callable[[], bool] | None) -> None:
        """Call ``fn()`` during computation; True aborts the decode (AbortedError). None restores the default."""
        self._abort_hook = None if fn is None else _AbortHook(fn)
        self._restore_abort()

    def _restore_abort(self) -> None:
        if self._abort_hook is not None:
            lib.llama_set_abort_callback(self.ptr, lib._llamabind_abort, self._abort_hook.handle)
        else:
            lib.llama_set_abort_callback(self.ptr, ffi.addressof(lib, "_llamabind_flag_abort"), self._abort_flag)

    def abort(self) -> None:
        """Stop the decode running now (from any thread); the next decode runs normally."""
        self._abort_flag[0] = 1

    # -- compute -----------------------------------------------------------------------------
    def _check_batch(self, batch: Batch) -> None:
        self.ptr  # raises ClosedError first
        n = batch.n_tokens
        if n == 0:
            raise InvalidInputError("empty batch")
        if n > self.n_batch:
            raise InvalidInputError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        if batch.embd is None:
            self.vocab.check_tokens(batch.token[:n])
        elif batch.embd.shape[1] != self.model.n_embd:
            raise InvalidInputError(f"batch embeddings have width {batch.embd.shape[1]}, model n_embd is {self.model.n_embd}")
        counts = batch.n_seq_id[:n]
        if int(counts.min()) < 1 or int(counts.max()) > batch.n_seq_max:
            raise InvalidInputError("n_seq_id out of range")
        used = batch.seq_id[:n][np.arange(batch.n_seq_max) < counts[:, None]]
        if used.size and (int(used.min()) < 0 or int(used.max()) >= self.n_seq_max):
            raise InvalidInputError(f"sequence id out of range [0, {self.n_seq_max}) (raise n_seq_max)")
        if int(batch.pos[:n].min()) < 0:
            raise InvalidInputError("negative position in batch")

    def decode(self, batch: Batch) -> None:
        """Run the model on ``batch`` (checked first); errors become DecodeError subclasses."""
        self._check_batch(batch)
        self._decode(batch)

    def _decode(self, batch: Batch, fn=lib.llama_decode, what: str = "llama_decode") -> None:
        """decode (or encode) without the input checks, for callers that built the batch themselves."""
        s = batch.struct()
        with self._lock:
            ptr = self.ptr
            self._abort_flag[0] = 0
            rc = fn(ptr, s)
        self._set_outputs(batch, rc)
        if rc:
            check_decode(rc, what, take_errors())

    def encode(self, batch: Batch) -> None:
        """Run the encoder on ``batch`` (encoder models: BERT, T5 ...)."""
        self._check_batch(batch)
        self._decode(batch, lib.llama_encode, "llama_encode")

    def synchronize(self) -> None:
        lib.llama_synchronize(self.ptr)

    # -- outputs -----------------------------------------------------------------------------
    def _set_outputs(self, batch: Batch, rc: int) -> None:
        rows = np.flatnonzero(batch.logits[: batch.n_tokens]) if rc == 0 else np.empty(0, np.intp)
        self._out_rows, self._n_outputs = rows, rows.size

    def mark_outputs(self, n_outputs: int) -> None:
        """Declare that a decode made outside this object (e.g. by libmtmd) left ``n_outputs``
        output rows, the last ones of its batch, so ``logits(-1)`` and samplers may read them."""
        self._out_rows, self._n_outputs = None, max(0, int(n_outputs))

    def _output_index(self, i: int) -> int:
        """Check that batch row ``i`` of the last decode has an output (negative: from the last output)."""
        rows, n = self._out_rows, self._n_outputs
        ok = -n <= i < 0 if i < 0 else (i < n if rows is None else bool(np.any(rows == i)))
        if not ok:
            raise InvalidInputError(f"batch row {i} of the last decode has no logits/embeddings "
                                    f"({n} outputs); request them with the batch's logits flags")
        return i

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of output row ``i`` of the last decode, as a float32 view (valid until the next decode)."""
        p = lib.llama_get_logits_ith(self.ptr, self._output_index(i))
        if p == ffi.NULL:
            raise InvalidInputError(f"no logits for output row {i}: {take_errors()}")
        return np.frombuffer(ffi.buffer(p, self.n_vocab * 4), dtype=np.float32)

    def embeddings(self, i: int = -1) -> np.ndarray:
        """Embedding of output row ``i`` of the last decode (pooling none), a float32 view."""
        if not self.embeddings_enabled:
            raise InvalidInputError("embeddings are off: create the context with embeddings=True")
        p = lib.llama_get_embeddings_ith(self.ptr, self._output_index(i))
        if p == ffi.NULL:
            raise InvalidInputError(f"no embedding for output row {i}: {take_errors()}")
        return np.frombuffer(ffi.buffer(p, self.model.n_embd_out * 4), dtype=np.float32)

    def embeddings_seq(self, seq_id: int, n: int | None = None) -> np.ndarray:
        """Pooled embedding of sequence ``seq_id`` (rank pooling: ``n_cls_out`` scores), a float32 view."""
        if not self.embeddings_enabled:
            raise InvalidInputError("embeddings are off: create the context with embeddings=True")
        self.memory._check_seq(seq_id)
        p = lib.llama_get_embeddings_seq(self.ptr, seq_id)
        if p == ffi.NULL:
            raise InvalidInputError(f"no pooled embedding for sequence {seq_id} (pooling none, or not decoded)")
        width = n if n is not None else self.model.n_embd_out
        return np.frombuffer(ffi.buffer(p, width * 4), dtype=np.float32)

    # -- perf and state ----------------------------------------------------------------------
    def perf(self) -> PerfData:
        d = lib.llama_perf_context(self.ptr)
        return PerfData(d.t_load_ms, d.t_p_eval_ms, d.t_eval_ms, d.n_p_eval, d.n_eval, d.n_reused)

    def perf_reset(self) -> None:
        lib.llama_perf_context_reset(self.ptr)

    def state_save(self) -> bytes:
        """The whole context state (KV cache, outputs, RNG) as bytes."""
        with self._lock:
            size = lib.llama_state_get_size(self.ptr)
            buf = bytearray(size)
            n = lib.llama_state_get_data(self.ptr, ffi.from_buffer("uint8_t[]", buf), size)
        return bytes(buf[:n])

    def state_load(self, data: bytes, tokens: Any = None) -> None:
        """Restore a state saved by ``state_save`` (same model and context parameters).

        ``tokens``: what sequence 0 held when saved (``cached_tokens(0)``), so that ``generate``
        reuses it as a cached prefix; without it the next generation decodes from scratch.
        """
        with self._lock:
            n = lib.llama_state_set_data(self.ptr, ffi.from_buffer("uint8_t[]", data), len(data))
        self._history.clear()
        if n == 0:
            raise InvalidInputError(f"state data rejected: {take_errors() or 'wrong size or model'}")
        if tokens is not None:
            self._history[0] = [int(t) for t in tokens]

    def cached_tokens(self, seq_id: int = 0) -> list[int]:
        """The tokens ``generate`` knows to be in the KV cache of a sequence (its reusable prefix)."""
        self.memory._check_seq(seq_id)
        return list(self._history.get(seq_id, []))

    def seq_state_save(self, seq_id: int) -> bytes:
        """One sequence's KV state as bytes."""
        self.memory._check_seq(seq_id)
        with self._lock:
            size = lib.llama_state_seq_get_size(self.ptr, seq_id)
            buf = bytearray(size)
            n = lib.llama_state_seq_get_data(self.ptr, ffi.from_buffer("uint8_t[]", buf), size, seq_id)
        return bytes(buf[:n])

    def seq_state_load(self, data: bytes, seq_id: int) -> None:
        """Load a sequence state saved by ``seq_state_save`` into ``seq_id``."""
        self.memory._check_seq(seq_id)
        with self._lock:
            n = lib.llama_state_seq_set_data(self.ptr, ffi.from_buffer("uint8_t[]", data), len(data), seq_id)
        self._history.pop(seq_id, None)
        if n == 0:
            raise InvalidInputError(f"sequence state rejected: {take_errors() or 'wrong size or model'}")

    def state_save_file(self, path: str | os.PathLike, tokens: Any = None) -> None:
        """Save the context state and ``tokens`` (default: the tokens of sequence 0 in the cache) to a file."""
        toks = np.ascontiguousarray(self._history.get(0, []) if tokens is None else tokens, dtype=np.int32)
        with self._lock:
            ok = lib.llama_state_save_file(self.ptr, os.fsencode(path), ffi.from_buffer("llama_token[]", toks), toks.size)
        if not ok:
            raise LlamaError(f"could not save state to {path}: {take_errors()}")

    def state_load_file(self, path: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
        """Load a state file; returns the tokens saved with it, which ``generate`` then reuses
        as the cached prefix of sequence 0."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"state file not found: {path}")
        cap = max_tokens or self.n_ctx
        toks = np.zeros(cap, dtype=np.int32)
        n = ffi.new("size_t *")
        with self._lock:
            ok = lib.llama_state_load_file(self.ptr, os.fsencode(path), ffi.from_buffer("llama_token[]", toks), cap, n)
        self._history.clear()
        if not ok:
            raise InvalidInputError(f"could not load state from {path}: {take_errors()}")
        self._history[0] = toks[: n[0]].tolist()
        return toks[: n[0]].copy()

    # -- generation bookkeeping ----------------------------------------------------------------
    def _acquire(self) -> None:
        with self._lock:
            if self._busy:
                raise BusyError("this context is already running a generation")
            self._busy = True

    def _release(self) -> None:
        self._busy = False


class Memory:
    """The context's memory (KV cache or recurrent state): sequence operations."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    @property
    def ptr(self):
        return lib.llama_get_memory(self._ctx.ptr)

    def _check_seq(self, seq_id: int, allow_all: bool = False) -> None:
        if allow_all and seq_id == -1:
            return
        if not 0 <= seq_id < self._ctx.n_seq_max:
            raise InvalidInputError(f"sequence id {seq_id} out of range [0, {self._ctx.n_seq_max})")

    def clear(self, data: bool = True) -> None:
        """Drop every sequence (``data`` also zeroes the buffers)."""
        lib.llama_memory_clear(self.ptr, data)
        self._ctx._history.clear()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (-1: all sequences / open ends); False if impossible."""
        self._check_seq(seq_id, allow_all=True)
        ok = bool(lib.llama_memory_seq_rm(self.ptr, seq_id, p0, p1))
        hist = self._ctx._history
        for s in (list(hist) if seq_id == -1 else [seq_id]):
            if s in hist:
                if ok and p1 < 0 and p0 >= 0:
                    del hist[s][p0:]
                else:
                    hist.pop(s)
        return ok

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy positions [p0, p1) of sequence ``src`` into ``dst``."""
        self._check_seq(src)
        self._check_seq(dst)
        lib.llama_memory_seq_cp(self.ptr, src, dst, p0, p1)
        self._ctx._history.pop(dst, None)

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence except ``seq_id``."""
        self._check_seq(seq_id)
        lib.llama_memory_seq_keep(self.ptr, seq_id)
        kept = self._ctx._history.get(seq_id)
        self._ctx._history.clear()
        if kept is not None:
            self._ctx._history[seq_id] = kept

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions [p0, p1) of a sequence by ``delta`` (needs ``can_shift``)."""
        self._check_seq(seq_id, allow_all=True)
        if not self.can_shift:
            raise InvalidInputError("this model's memory cannot shift positions")
        lib.llama_memory_seq_add(self.ptr, seq_id, p0, p1, delta)
        self._forget(seq_id)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide positions [p0, p1) of a sequence by ``d`` (needs ``can_shift``)."""
        self._check_seq(seq_id, allow_all=True)
        if d < 1:
            raise InvalidInputError("divisor must be >= 1")
        if not self.can_shift:
            raise InvalidInputError("this model's memory cannot shift positions")
        lib.llama_memory_seq_div(self.ptr, seq_id, p0, p1, d)
        self._forget(seq_id)

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position of the sequence in memory, -1 if empty."""
        self._check_seq(seq_id)
        return lib.llama_memory_seq_pos_min(self.ptr, seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position of the sequence in memory, -1 if empty."""
        self._check_seq(seq_id)
        return lib.llama_memory_seq_pos_max(self.ptr, seq_id)

    @property
    def can_shift(self) -> bool:
        return bool(lib.llama_memory_can_shift(self.ptr))

    def _forget(self, seq_id: int) -> None:
        if seq_id == -1:
            self._ctx._history.clear()
        else:
            self._ctx._history.pop(seq_id, None)
