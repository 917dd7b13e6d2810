"""An inference context (``llama_context``): decode/encode, logits and embeddings, memory, state."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from . import _params, fit
from ._handle import Handle
from .batch import Batch
from .raw import check_decode, clear_errors, fail, ffi, lib
from .errors import ClosedError, InvalidInputError, LlamaError, ModelLoadError
from .memory import CachedTokens, Memory
from .state import ContextState
from ._abort import Aborts, AbortHook
from ._gate import Gate
from .model import LoraAdapter, Model

# ggml's own bound (GGML_MAX_N_THREADS): more threads fail inside llama_decode with std::bad_alloc
MAX_THREADS = 512


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


def _check_threads(*counts: int | None) -> None:
    for n in counts:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS):
            raise InvalidInputError(f"thread counts must be ints in [1, {MAX_THREADS}], not {n!r}")


class Context(ContextState, Aborts, Handle):
    """A llama.cpp context over a model: the KV cache, the compute buffers and the outputs.

    Keyword arguments set ``llama_context_params`` fields by name; enums take short names
    (``pooling="mean"``, ``flash_attn="enabled"`` or a bool, ``type_k="q8_0"``). ``n_threads``
    defaults to the number of CPUs.

    Threads: every call that touches the C context passes its gate (``hold()``, see ``_gate``):
    one thread at a time, and a second thread gets BusyError at once instead of waiting. A
    generation or an engine claims the context (``lease()``, ``claim``): other calls get
    BusyError until it ends. ``close()`` from another thread aborts a running decode and waits
    for it; it never frees memory under llama.cpp.
    """

    def __init__(self, model: Model, *, n_ctx: int | fit.Auto = 4096, n_batch: int = 2048, n_ubatch: int = 512,
                 n_seq_max: int = 1, n_threads: int | None = None, n_threads_batch: int | None = None,
                 embeddings: bool = False, **params: Any) -> None:
        if not isinstance(model, Model):
            raise InvalidInputError(f"Context needs a Model, not {type(model).__name__}")
        if model.vocab_only:
            raise InvalidInputError("this model was loaded with vocab_only=True: it has no weights to run")
        _check_threads(n_threads, n_threads_batch)
        threads = n_threads or min(os.cpu_count() or 4, MAX_THREADS)
        values = {"n_ctx": fit.context_size(model) if n_ctx == fit.AUTO else n_ctx,
                  "n_batch": n_batch, "n_ubatch": min(n_ubatch, n_batch),
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
        # The one abort flag (close(), abort()) and a Cancel's while a generation runs: both are
        # read by the C callback between graph nodes, and by a Python abort callback first.
        self._abort_flag = ffi.new("int *")
        self._abort_flags = ffi.new("int *[2]", [self._abort_flag, ffi.NULL])
        cparams.abort_callback = ffi.addressof(lib, "_llamabind_flag_abort")
        cparams.abort_callback_data = self._abort_flags
        with model.hold():
            if model._rpc is not None:
                model._rpc.check()
            clear_errors()
            ptr = lib.llama_init_from_model(model.ptr, cparams)
            if ptr == ffi.NULL:
                fail(ModelLoadError, "could not create a context")
            super().__init__(ptr, lib.llama_free, parent=model)
        self.model = model
        self.vocab = model.vocab
        self._gate = Gate("this context")
        self._abort_hook: AbortHook | None = None
        self._abort_handle: Any = None
        self._loras: list[tuple[LoraAdapter, float]] = []
        self._n_outputs = 0
        self._out_rows: np.ndarray | None = None  # batch rows with outputs; None: every row
        self._tokens = CachedTokens()
        self.kv_unified: bool = bool(cparams.kv_unified)
        self.n_ctx: int = lib.llama_n_ctx(ptr)
        self.n_batch: int = lib.llama_n_batch(ptr)
        self.n_ubatch: int = lib.llama_n_ubatch(ptr)
        self.n_seq_max: int = lib.llama_n_seq_max(ptr)
        self.n_ctx_seq: int = lib.llama_n_ctx_seq(ptr)
        self.n_vocab: int = model.vocab.n_tokens
        self.embeddings_enabled = bool(embeddings)
        self._one_ubatch = not lib.llama_get_causal_attn(ptr) or not model.has_decoder  # see _check_fits

    @property
    def memory(self) -> Memory:
        """Sequence operations on the KV cache / recurrent state."""
        return Memory(self)

    def check_seq(self, seq_id: int, allow_all: bool = False) -> None:
        """Raise InvalidInputError unless ``seq_id`` is in [0, n_seq_max) (or -1 with ``allow_all``)."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise InvalidInputError(f"sequence id must be an int, not {type(seq_id).__name__}")
        if allow_all and seq_id == -1:
            return
        if not 0 <= seq_id < self.n_seq_max:
            raise InvalidInputError(f"sequence id {seq_id} out of range [0, {self.n_seq_max})")

    # -- threads and lifetime ------------------------------------------------------------------
    def hold(self, owner: object = None) -> Any:
        """Enter the context's gate for a few calls (``with ctx.hold(): ...``): no other thread
        decodes, edits memory or closes meanwhile; BusyError if another thread is inside or an
        owner other than ``owner`` has claimed it, ClosedError once closed."""
        return self._gate.use(owner)

    @contextmanager
    def lease(self) -> Iterator[object]:
        """Claim the context for one generation; yields the owner token to pass to ``hold``.
        BusyError while another generation or an engine drives it."""
        token = _Lease()
        self.claim(token)
        try:
            yield token
        finally:
            self._gate.release(token)

    def claim(self, owner: object) -> None:
        """Reserve the context for ``owner`` (an engine) until ``release``: calls from anyone else
        get BusyError meanwhile."""
        self.ptr
        self._gate.claim(owner)

    def release(self, owner: object) -> None:
        """End ``owner``'s claim (nothing if it holds none)."""
        self._gate.release(owner)

    @property
    def closing(self) -> bool:
        """Whether ``close()`` has begun (a decode running now is being aborted for it)."""
        return self._gate.closing

    def close(self) -> None:
        """Free the context; a decode running in another thread is aborted and waited for
        (BusyError from inside a callback that the decode runs)."""
        if self._ptr is None:
            return
        self._gate.shut(self.abort)
        if self._ptr is None:
            return
        for adapter, _ in self._loras:
            adapter._users.discard(self)
        self._loras = []
        super().close()

    # -- configuration -----------------------------------------------------------------------
    @property
    def pooling_type(self) -> int:
        with self.hold():
            return lib.llama_pooling_type(self.ptr)

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        _check_threads(n_threads, n_threads_batch)
        with self.hold():
            lib.llama_set_n_threads(self.ptr, n_threads, n_threads_batch or n_threads)

    @property
    def n_threads(self) -> int:
        with self.hold():
            return lib.llama_n_threads(self.ptr)

    def set_embeddings(self, on: bool) -> None:
        """Switch embedding output on or off for later decodes."""
        with self.hold():
            lib.llama_set_embeddings(self.ptr, on)
            self.embeddings_enabled = bool(on)

    def set_causal_attn(self, causal: bool) -> None:
        with self.hold():
            lib.llama_set_causal_attn(self.ptr, causal)
            self._one_ubatch = not causal or not self.model.has_decoder

    @property
    def causal_attn(self) -> bool:
        """Whether decodes use causal attention (non-causal batches must fit in one ubatch)."""
        with self.hold():
            return bool(lib.llama_get_causal_attn(self.ptr))

    def _check_fits(self, n: int, encode: bool) -> None:
        """llama.cpp aborts on an encoder or non-causal batch larger than one ubatch."""
        if (encode or self._one_ubatch) and n > self.n_ubatch:
            raise InvalidInputError(f"a batch for {'llama_encode' if encode else 'non-causal attention'} must fit "
                                    f"in one ubatch: {n} tokens > n_ubatch={self.n_ubatch}")

    def set_loras(self, adapters: Mapping[LoraAdapter, float]) -> None:
        """Apply LoRA adapters with scales (an empty mapping removes all); the context keeps them alive."""
        items = [(a, float(s)) for a, s in adapters.items()]
        for a, _ in items:
            if not isinstance(a, LoraAdapter) or a.model is not self.model:
                raise InvalidInputError("LoRA adapter belongs to another model")
            a.ptr  # ClosedError for a closed adapter
        with self.hold():
            ptrs = ffi.new("struct llama_adapter_lora *[]", [a.ptr for a, _ in items] or [ffi.NULL])
            scales = ffi.new("float[]", [s for _, s in items] or [0.0])
            if lib.llama_set_adapters_lora(self.ptr, ptrs, len(items), scales) != 0:
                fail(LlamaError, "llama_set_adapters_lora failed")
            for a, _ in self._loras:
                a._users.discard(self)
            self._loras = items
            for a, _ in items:
                a._users.add(self)

    def _drop_lora(self, adapter: LoraAdapter) -> None:
        """An adapter in use is being closed: take it out of this context first."""
        if self._ptr is not None:
            self.set_loras({a: s for a, s in self._loras if a is not adapter})

    # -- compute -----------------------------------------------------------------------------
    def _check_batch(self, batch: Batch, encode: bool = False) -> None:
        self.ptr  # raises ClosedError first
        if not isinstance(batch, Batch):
            raise InvalidInputError(f"expected a Batch, not {type(batch).__name__}")
        n = batch.n_tokens
        if n == 0:
            raise InvalidInputError("empty batch")
        if n > self.n_batch:
            raise InvalidInputError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        self._check_fits(n, encode)
        batch.validate(self.n_vocab, self.n_seq_max, self.model.n_embd)

    def decode(self, batch: Batch) -> None:
        """Run the model on ``batch`` (checked first); errors become DecodeError subclasses."""
        with self.hold():
            self._check_batch(batch)
            self.run(batch)

    def encode(self, batch: Batch) -> None:
        """Run the encoder on ``batch`` (encoder models: BERT, T5 ...); it must fit in one ubatch."""
        with self.hold():
            if not self.model.has_encoder and lib.llama_get_memory(self.ptr) != ffi.NULL:
                raise InvalidInputError("this model has no encoder: use decode()")
            self._check_batch(batch, encode=True)
            self.run(batch, encode=True)

    def run(self, batch: Batch, encode: bool = False, *, all_outputs: bool = False) -> None:
        """decode (or encode) ``batch`` without the input checks, for loops that built it themselves.

        The caller vouches for the batch (tokens, positions, sequence ids, size; its arrays'
        memory is what the C struct reads); everything else (lock, abort flag, output bookkeeping, errors)
        is as in ``decode``. ``all_outputs``: every row asked for logits (skips counting them).
        """
        fn, what = (lib.llama_encode, "llama_encode") if encode else (lib.llama_decode, "llama_decode")
        s = batch.struct()
        gate = self._gate
        with gate:
            ptr = self.ptr
            if (encode or self._one_ubatch) and batch.n_tokens > self.n_ubatch:  # causal attention may have changed
                self._check_fits(batch.n_tokens, encode)
            self._abort_flag[0] = 0
            if gate.closing:  # close() set the flag before the clear above: do not start
                raise ClosedError("this context is being closed")
            gate.in_c = True
            try:
                rc = fn(ptr, s)
            finally:
                gate.in_c = False
            if self.model._rpc is not None:  # a lost server: its zeros are not the model's outputs
                self.check_remote()
            if all_outputs and rc == 0:
                self._out_rows, self._n_outputs = None, batch.n_tokens
            else:
                self._set_outputs(batch, rc)
            if rc:
                hook = self._abort_hook
                if rc == 2 and hook is not None and hook.error is not None:
                    error, hook.error = hook.error, None
                    clear_errors()
                    raise error
                check_decode(rc, what)

    def check_remote(self) -> None:
        """RpcServerLostError if an RPC server of the model was lost (the last outputs are dropped)."""
        rpc = self.model._rpc
        if rpc is not None and rpc.lost():
            self._out_rows, self._n_outputs = np.empty(0, np.intp), 0
            clear_errors()
            rpc.check()

    def synchronize(self) -> None:
        with self.hold():
            lib.llama_synchronize(self.ptr)

    # -- outputs -----------------------------------------------------------------------------
    def _set_outputs(self, batch: Batch, rc: int) -> None:
        rows = batch.output_rows() if rc == 0 else np.empty(0, np.intp)
        self._out_rows, self._n_outputs = rows, rows.size

    def set_outputs(self, n_outputs: int, rows: np.ndarray | None = None) -> None:
        """Record the outputs of a decode made outside ``decode`` (a decode loop, libmtmd): ``rows``
        (batch rows with outputs), or the last ``n_outputs`` rows of its batch."""
        self._out_rows, self._n_outputs = rows, max(0, int(n_outputs))


    @property
    def n_outputs(self) -> int:
        """How many output rows (logits/embeddings) the last decode produced."""
        return self._n_outputs

    def check_output(self, i: int) -> int:
        """Check that batch row ``i`` of the last decode has an output (negative: from the last output)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InvalidInputError(f"output row must be an int, not {type(i).__name__}")
        rows, n = self._out_rows, self._n_outputs
        ok = -n <= i < 0 if i < 0 else (i < n if rows is None else bool(np.any(rows == i)))
        if not ok:
            raise InvalidInputError(f"batch row {i} of the last decode has no logits/embeddings "
                                    f"({n} outputs); request them with the batch's logits flags")
        return int(i)

    def _copy(self, p: Any, n: int) -> np.ndarray:
        return np.frombuffer(ffi.buffer(p, n * 4), dtype=np.float32).copy()

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of output row ``i`` of the last decode, as a float32 array of its own.

        A copy (about 50 µs for 262k tokens), since llama.cpp reuses or reallocates its buffer at
        the next decode; samplers read the buffer in place.
        """
        with self.hold():
            p = lib.llama_get_logits_ith(self.ptr, self.check_output(i))
            if p == ffi.NULL:
                fail(InvalidInputError, f"no logits for output row {i}")
            return self._copy(p, self.n_vocab)

    def embeddings(self, i: int = -1) -> np.ndarray:
        """Embedding of output row ``i`` of the last decode (pooling none), a float32 array."""
        with self.hold():
            if not self.embeddings_enabled:
                raise InvalidInputError("embeddings are off: create the context with embeddings=True")
            p = lib.llama_get_embeddings_ith(self.ptr, self.check_output(i))
            if p == ffi.NULL:
                fail(InvalidInputError, f"no embedding for output row {i}")
            return self._copy(p, self.model.n_embd_out)

    def embeddings_seq(self, seq_id: int, n: int | None = None) -> np.ndarray:
        """Pooled embedding of sequence ``seq_id`` (rank pooling: ``n_cls_out`` scores), a float32 array;
        ``n`` takes only the first ``n`` values."""
        with self.hold():
            if not self.embeddings_enabled:
                raise InvalidInputError("embeddings are off: create the context with embeddings=True")
            self.check_seq(seq_id)
            rank = lib.llama_pooling_type(self.ptr) == lib.LLAMA_POOLING_TYPE_RANK
            width = max(self.model.n_cls_out, 1) if rank else self.model.n_embd_out
            if n is not None and not 1 <= n <= width:
                raise InvalidInputError(f"n={n} out of range [1, {width}] for this pooling")
            p = lib.llama_get_embeddings_seq(self.ptr, seq_id)
            if p == ffi.NULL:
                raise InvalidInputError(f"no pooled embedding for sequence {seq_id} (pooling none, or not decoded)")
            return self._copy(p, width if n is None else n)

    # -- perf ----------------------------------------------------------------------------
    def perf(self) -> PerfData:
        with self.hold():
            d = lib.llama_perf_context(self.ptr)
        return PerfData(d.t_load_ms, d.t_p_eval_ms, d.t_eval_ms, d.n_p_eval, d.n_eval, d.n_reused)

    def perf_reset(self) -> None:
        with self.hold():
            lib.llama_perf_context_reset(self.ptr)


class _Lease:
    """The owner token of one generation's claim on a context."""

    __slots__ = ()
    gate_name = "a generation"
