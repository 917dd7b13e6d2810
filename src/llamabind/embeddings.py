"""Embeddings and reranking over a context in embedding mode.

``Embedder(model)`` owns a context made for embeddings (all sequences in one unified KV
cache, up to ``llama_max_parallel_sequences()`` texts per batch) and turns texts into
float32 numpy arrays:

    emb = Embedder(model, pooling="mean")
    vecs = emb.embed(["a text", "another"], normalize="l2", dim=256)   # (2, 256)
    toks = Embedder(model, pooling="none").embed_tokens(["a text"])     # [(n_tokens, n_embd)]
    hits = Embedder(reranker, pooling="rank").rerank("query", docs, top_n=3)

Many texts are packed into one batch by sequence id, split over several batches when
they do not fit; encoder-only models (BERT family, no KV memory) run through
``llama_encode``, decoder models through ``llama_decode``. Results are read straight from
llama.cpp's output buffers: one memcpy per pooled sequence, one numpy copy per batch for
per-token output. Normalisations follow llama.cpp's ``common_embd_normalize``
(``--embd-normalize``): none (-1), max-abs int16 (0), taxicab (1), euclidean (2), p-norm (p).
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import numpy as np

from .batch import Batch
from .raw import ffi, lib
from .context import Context
from .errors import ContextOverflowError, InvalidInputError
from .model import Model

__all__ = ["Embedder", "Reranker", "RerankResult", "normalize", "is_reranker", "POOLING", "NORMALIZE"]

#: pooling names accepted by Embedder (llama.cpp's ``--pooling``); None/"default": the model's own
POOLING = ("none", "mean", "cls", "last", "rank")
#: normalisation names accepted by ``normalize=`` (integers as in llama.cpp's ``--embd-normalize`` also work)
NORMALIZE = ("none", "maxabs", "taxicab", "l2", "pnorm")

_POOLING_IDS = {
    "unspecified": lib.LLAMA_POOLING_TYPE_UNSPECIFIED, "none": lib.LLAMA_POOLING_TYPE_NONE,
    "mean": lib.LLAMA_POOLING_TYPE_MEAN, "cls": lib.LLAMA_POOLING_TYPE_CLS,
    "last": lib.LLAMA_POOLING_TYPE_LAST, "rank": lib.LLAMA_POOLING_TYPE_RANK,
}
_POOLING_NAMES = {v: k for k, v in _POOLING_IDS.items()}
_INT16_SCALE = 32760.0  # common_embd_normalize: max-abs maps onto the int16 range

Normalize = Union[str, int, None]
_NO_RERANKER = ("rank pooling needs a reranker: a model with a classification head (cls / cls.output tensors, "
                "classifier labels or a rerank template); this model has none")


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One document of a rerank: its position in the input, its score and its text."""

    index: int
    score: float
    document: str


# -- normalisation -------------------------------------------------------------------------------

def _norm_mode(mode: Normalize, p: float | None) -> tuple[str, float]:
    """Resolve a ``normalize=`` value (name or llama.cpp integer) to (name, p)."""
    if isinstance(mode, bool):
        raise InvalidInputError(f"normalize must be one of {', '.join(NORMALIZE)} or an int, not {mode!r}")
    if mode is None:
        return "none", 0.0
    if mode == "auto":
        mode = "l2"
    if isinstance(mode, (int, np.integer)):
        mode = int(mode)
        if mode < 0:
            return "none", 0.0
        if mode == 0:
            return "maxabs", 0.0
        return ("l2", 2.0) if mode == 2 else ("pnorm", float(mode))
    if not isinstance(mode, str):
        raise InvalidInputError(f"normalize must be one of {', '.join(NORMALIZE)} or an int, not {type(mode).__name__}")
    name = mode.lower().replace("-", "").replace("_", "")
    name = {"euclidean": "l2", "l1": "taxicab", "int16": "maxabs", "max": "maxabs"}.get(name, name)
    if name == "taxicab":
        return "pnorm", 1.0
    if name == "pnorm":
        if p is None:
            raise InvalidInputError("normalize='pnorm' needs p= (p=1 taxicab, p=2 euclidean)")
        if not (isinstance(p, (int, float)) and np.isfinite(p) and p > 0):
            raise InvalidInputError(f"p must be a finite number > 0, got {p!r}")
        return ("l2", 2.0) if p == 2 else ("pnorm", float(p))
    if name in ("none", "maxabs", "l2"):
        return name, 0.0
    raise InvalidInputError(f"unknown normalize {mode!r}: use one of {', '.join(NORMALIZE)} or an int")


def normalize(x: np.ndarray, mode: Normalize = "l2", p: float | None = None) -> np.ndarray:
    """The rows of ``x`` normalised like llama.cpp's common_embd_normalize, as a new float32 array."""
    return _normalize(np.array(x, dtype=np.float32), *_norm_mode(mode, p))


def _normalize(x: np.ndarray, name: str, pp: float) -> np.ndarray:
    """Normalise the rows of the float32 array ``x`` in place (norms accumulated in float64)."""
    if name == "none" or x.size == 0:
        return x
    x64 = x.astype(np.float64)
    if name == "maxabs":
        s = np.abs(x64).max(axis=-1, keepdims=True) / _INT16_SCALE
    elif name == "l2":
        s = np.sqrt(np.einsum("...i,...i->...", x64, x64))[..., None]
    else:
        s = np.power(np.power(np.abs(x64), pp).sum(axis=-1, keepdims=True), 1.0 / pp)
    with np.errstate(divide="ignore"):
        scale = np.where(s > 0.0, 1.0 / s, 0.0).astype(np.float32)
    np.multiply(x, scale, out=x)
    return x




# -- model facts ---------------------------------------------------------------------------------

def _gguf_tensor_names(path: str) -> set[str]:
    """Names of the tensors in a GGUF file (header walk only; empty set if it cannot be read)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                return set()
            n_tensors, n_kv = struct.unpack_from("<qq", head, 8)

            def u64() -> int:
                return struct.unpack("<Q", f.read(8))[0]

            def skip_value(t: int) -> None:
                if t == 8:
                    f.seek(u64(), os.SEEK_CUR)
                elif t == 9:
                    et, n = struct.unpack("<I", f.read(4))[0], u64()
                    if et == 8:
                        for _ in range(n):
                            f.seek(u64(), os.SEEK_CUR)
                    elif et in sizes:
                        f.seek(n * sizes[et], os.SEEK_CUR)
                    else:
                        raise ValueError("nested array")
                else:
                    f.seek(sizes[t], os.SEEK_CUR)

            for _ in range(n_kv):
                f.seek(u64(), os.SEEK_CUR)
                skip_value(struct.unpack("<I", f.read(4))[0])
            names = set()
            for _ in range(n_tensors):
                names.add(f.read(u64()).decode("utf-8", "replace"))
                n_dims = struct.unpack("<I", f.read(4))[0]
                f.seek(8 * n_dims + 4 + 8, os.SEEK_CUR)
            return names
    except (OSError, ValueError, KeyError, struct.error):
        return set()


def is_reranker(model: Model) -> bool:
    """True if the model has a classification head for rank pooling (cls/cls.output tensors, labels, rerank template)."""
    arch = model.architecture or ""
    if model.meta(f"{arch}.pooling_type") == str(int(lib.LLAMA_POOLING_TYPE_RANK)):
        return True
    if model.meta(f"{arch}.classifier.output_labels") is not None or model.chat_template("rerank") is not None:
        return True
    names = _gguf_tensor_names(model.path)
    return "cls.output.weight" in names or "cls.weight" in names


def _pooling_id(pooling: str | int | None) -> int:
    if pooling is None or pooling == "default":
        return lib.LLAMA_POOLING_TYPE_UNSPECIFIED
    if isinstance(pooling, str) and pooling.lower() in _POOLING_IDS:
        return _POOLING_IDS[pooling.lower()]
    if isinstance(pooling, int) and not isinstance(pooling, bool) and pooling in _POOLING_NAMES:
        return pooling
    raise InvalidInputError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLING)} or None (model default)")


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise InvalidInputError("texts must be a list of strings, not a single string (wrap it in a list)")
    try:
        items = list(texts)
    except TypeError:
        raise InvalidInputError(f"texts must be a list of strings, not {type(texts).__name__}") from None
    if not items:
        raise InvalidInputError("texts is empty: nothing to embed")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InvalidInputError(f"text {i} is {type(t).__name__}, not str")
        if not t:
            raise InvalidInputError(f"text {i} is an empty string")
    return items


# -- the embedder --------------------------------------------------------------------------------

class Embedder:
    """Embeddings (and rerank scores) from a model, over a context in embedding mode.

    ``source`` is a Model (a context is made and owned: unified KV cache, ``n_seq_max``
    sequences per batch), a GGUF path (the model is loaded and owned too), or an existing
    Context created with ``embeddings=True`` (used as it is). ``pooling``: ``none``,
    ``mean``, ``cls``, ``last``, ``rank`` or None for the model's default. Extra keyword
    arguments go to Context (``flash_attn``, ``type_k``, ...) or, for a path, to Model.
    """

    def __init__(self, source: Model | Context | str | os.PathLike, *, pooling: str | int | None = None,
                 n_ctx: int | None = None, n_batch: int | None = None, n_seq_max: int | None = None,
                 n_threads: int | None = None, query_prefix: str = "", document_prefix: str = "",
                 parse_special: bool = False, **params: Any) -> None:
        self._own_model = self._own_ctx = False
        if isinstance(source, (str, os.PathLike)):
            model_keys = ("n_gpu_layers", "main_gpu", "split_mode", "use_mmap", "use_mlock", "sha256", "check")
            source = Model(source, **{k: params.pop(k) for k in model_keys if k in params})
            self._own_model = True
        try:
            if isinstance(source, Context):
                if pooling is not None or n_ctx or n_batch or n_seq_max or n_threads or params:
                    raise InvalidInputError("pass context settings when creating the Context, not to Embedder")
                ctx = source
                if not ctx.embeddings_enabled:
                    raise InvalidInputError("the context is not in embedding mode: create it with embeddings=True")
                model = ctx.model
            elif isinstance(source, Model):
                model = source
                self._check_model(model)
                pid = _pooling_id(pooling)
                if pid == lib.LLAMA_POOLING_TYPE_RANK and not is_reranker(model):
                    raise InvalidInputError(_NO_RERANKER)
                ctx = self._make_context(model, pid, n_ctx, n_batch, n_seq_max, n_threads, params)
                self._own_ctx = True
            else:
                raise InvalidInputError(f"Embedder needs a Model, a Context or a GGUF path, not {type(source).__name__}")
            self._check_model(model)
        except BaseException:
            if self._own_model:
                source.close()
            raise
        self.model: Model = model
        self.ctx: Context = ctx
        self.vocab = model.vocab
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.parse_special = parse_special
        self._lock = threading.Lock()
        self.pooling: str = _POOLING_NAMES.get(ctx.pooling_type, str(ctx.pooling_type))
        if self.pooling == "rank" and not is_reranker(model):
            self.close()
            raise InvalidInputError(_NO_RERANKER)
        self.n_embd: int = model.n_embd_out
        self.n_cls_out: int = model.n_cls_out
        # encoder-only models (BERT family) have no KV memory: llama_decode would forward to llama_encode
        self._use_encode = model.has_encoder or lib.llama_get_memory(ctx.ptr) == ffi.NULL
        causal = bool(lib.llama_get_causal_attn(ctx.ptr)) and not self._use_encode
        # non-causal attention (and llama_encode) take a batch in one ubatch; KV memory must hold it
        limit = ctx.n_batch if causal else min(ctx.n_batch, ctx.n_ubatch)
        if not self._use_encode:
            limit = min(limit, ctx.n_ctx_seq, ctx.n_ctx)
        self.batch_tokens: int = limit
        n_train = model.n_ctx_train
        self.max_tokens: int = min(limit, n_train) if n_train > 0 else limit
        self.n_seq_max: int = ctx.n_seq_max
        self._batch = Batch(self.batch_tokens, 1)
        self._batch.logits[:] = 1

    @staticmethod
    def _check_model(model: Model) -> None:
        if model.has_encoder and model.has_decoder:
            raise InvalidInputError("embeddings from encoder-decoder models (T5 ...) are not supported by llama.cpp")
        if model.n_embd_out <= 0:
            raise InvalidInputError("this model has no embedding output")

    @staticmethod
    def _make_context(model: Model, pooling: int, n_ctx: int | None, n_batch: int | None, n_seq_max: int | None,
                      n_threads: int | None, params: dict[str, Any]) -> Context:
        n_train = model.n_ctx_train
        if n_ctx is None:
            n_ctx = min(n_train, 8192) if n_train > 0 else 4096
        if n_batch is None:
            n_batch = n_ctx
        if n_ctx < 1 or n_batch < 1:
            raise InvalidInputError("n_ctx and n_batch must be >= 1")
        n_batch = min(n_batch, n_ctx)  # llama.cpp clamps it so for causal models; raise n_ctx for bigger batches
        # llama.cpp aborts creating the context (GGML_ASSERT in output_reserve) if n_seq_max exceeds
        # n_outputs_max (n_batch by default), and (ggml_can_mul_mat, pooled graph reserve) if
        # n_ubatch is not a multiple of n_seq_max: only divisors of n_batch are safe.
        most = min(int(lib.llama_max_parallel_sequences()), params.get("n_outputs_max") or n_batch)
        if n_seq_max is None:
            want = min(4 if (model.is_recurrent or model.is_hybrid) else most, most)
            n_seq_max = max(d for d in range(1, want + 1) if n_batch % d == 0)
        if isinstance(n_seq_max, bool) or not isinstance(n_seq_max, int) or not 1 <= n_seq_max <= most \
                or n_batch % n_seq_max:
            raise InvalidInputError(f"n_seq_max={n_seq_max!r}: must divide n_batch={n_batch} and be in [1, {most}] "
                                    f"(llama.cpp aborts otherwise)")
        values: dict[str, Any] = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_seq_max,
                                      n_threads=n_threads, embeddings=True, pooling=pooling, kv_unified=True)
        values.update(params)
        try:
            return Context(model, **values)
        except (TypeError, ValueError) as e:
            if isinstance(e, InvalidInputError):
                raise
            raise InvalidInputError(str(e)) from e

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context (and the model) if this Embedder made them."""
        if getattr(self, "_own_ctx", False):
            self.ctx.close()
        if getattr(self, "_own_model", False):
            self.model.close()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Embedder pooling={self.pooling} n_embd={self.n_embd} batch_tokens={self.batch_tokens} "
                f"n_seq_max={self.n_seq_max}>")

    # -- tokens ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], *, prefix: str | None = None, truncate: bool = False,
                 parse_special: bool | None = None) -> list[np.ndarray]:
        """Tokenize texts as embed() does (prefix, special tokens, length check or truncation)."""
        items = _check_texts(texts)
        if prefix is not None and not isinstance(prefix, str):
            raise InvalidInputError(f"prefix must be str, not {type(prefix).__name__}")
        special = self.parse_special if parse_special is None else parse_special
        tokenize = self.vocab.tokenize
        pre = prefix or ""
        return self._fit([tokenize(pre + t, True, special) for t in items], truncate)

    def _fit(self, toks: list[np.ndarray], truncate: bool) -> list[np.ndarray]:
        """Check (or truncate) each token array to ``max_tokens``; the trailing EOS/SEP is kept."""
        limit = self.max_tokens
        ends = {t for t in (self.vocab.eos, self.vocab.sep) if t is not None}
        for i, t in enumerate(toks):
            if t.size == 0:
                raise InvalidInputError(f"text {i} gives no tokens")
            if t.size > limit:
                if not truncate:
                    raise ContextOverflowError(
                        f"text {i} has {t.size} tokens, more than the {limit} one sequence may hold "
                        f"(min of n_batch/n_ubatch, n_ctx and the model's n_ctx_train); pass truncate=True to cut it")
                toks[i] = np.concatenate([t[: limit - 1], t[-1:]]) if int(t[-1]) in ends else t[:limit]
        return toks

    # -- compute -----------------------------------------------------------------------------
    def _run(self, toks: list[np.ndarray], width: int) -> list[np.ndarray]:
        """Pack the sequences into batches, run them, and return one float32 array per batch:
        (n_seqs, width) for pooled output, (n_tokens, n_embd) for per-token output."""
        ctx = self.ctx
        with self._lock:
            ctx.ptr  # ClosedError first
            with ctx.lease(), ctx.hold():  # BusyError while a generation (or another Embedder) drives it
                return [self._batch_run(group, width) for group in self._pack(toks)]

    def _pack(self, toks: list[np.ndarray]) -> Iterable[list[np.ndarray]]:
        """Greedy packing in input order, as llama.cpp's embedding tool does."""
        lens = np.fromiter((t.size for t in toks), dtype=np.int64, count=len(toks))
        start, n = 0, len(toks)
        while start < n:
            csum = np.cumsum(lens[start: start + self.n_seq_max])
            k = max(1, int(np.searchsorted(csum, self.batch_tokens, side="right")))
            yield toks[start: start + k]
            start += k

    def _batch_run(self, group: list[np.ndarray], width: int) -> np.ndarray:
        """Run one batch of sequences (seq ids 0..k-1, positions from 0) and copy its outputs once."""
        ctx, batch, k = self.ctx, self._batch, len(group)
        lens = np.fromiter((t.size for t in group), dtype=np.int64, count=k)
        total = int(lens.sum())
        batch.token[:total] = np.concatenate(group) if k > 1 else group[0]
        starts = np.cumsum(lens) - lens
        batch.pos[:total] = np.arange(total, dtype=np.int32) - np.repeat(starts, lens)
        batch.seq_id[:total, 0] = np.repeat(np.arange(k, dtype=np.int32), lens)
        batch.n_seq_id[:total] = 1
        batch.logits[:total] = 1  # embeddings need every token's output
        batch.n_tokens = total
        if self._use_encode:
            ctx.encode(batch)
        else:
            ctx.memory.clear()
            ctx.decode(batch)
        ptr = ctx.ptr
        if self.pooling == "none":
            p = lib.llama_get_embeddings(ptr)
            if p == ffi.NULL:
                raise InvalidInputError("llama.cpp returned no token embeddings")
            return np.frombuffer(ffi.buffer(p, total * width * 4), dtype=np.float32).reshape(total, width).copy()
        res = np.empty((k, width), dtype=np.float32)
        dst = ffi.cast("char *", ffi.from_buffer(res))
        row = width * 4
        for s in range(k):
            p = lib.llama_get_embeddings_seq(ptr, s)
            if p == ffi.NULL:
                raise InvalidInputError(f"llama.cpp returned no pooled embedding for sequence {s}")
            ffi.memmove(dst + s * row, p, row)
        return res

    def _check_dim(self, dim: int | None) -> None:
        if dim is None:
            return
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise InvalidInputError(f"dim must be an int, not {type(dim).__name__}")
        if not 1 <= dim <= self.n_embd:
            raise InvalidInputError(f"dim={dim} is out of range [1, {self.n_embd}] (the model's embedding size)")

    def embed(self, texts: Sequence[str], *, normalize: Normalize = "auto", p: float | None = None,
              dim: int | None = None, prefix: str | None = None, truncate: bool = False) -> np.ndarray:
        """Pooled embeddings of ``texts``, float32 (n_texts, dim or n_embd); rank pooling: raw scores (n_texts, n_cls_out).

        ``normalize``: ``"auto"`` (L2 for embeddings, none for rank scores), ``none``, ``l2``,
        ``maxabs``, ``taxicab``, ``pnorm`` (with ``p``) or a llama.cpp ``--embd-normalize`` int.
        ``dim`` keeps the first ``dim`` components (Matryoshka) before normalising.
        """
        if self.pooling == "none":
            raise InvalidInputError("pooling is none: use embed_tokens() for per-token vectors")
        rank = self.pooling == "rank"
        if rank and (dim is not None or normalize not in ("auto", "none", None, -1)):
            raise InvalidInputError("rank pooling gives scores: dim and normalize do not apply")
        mode, pp = _norm_mode("none" if rank else normalize, p)
        self._check_dim(dim)
        toks = self.tokenize(texts, prefix=prefix, truncate=truncate)
        width = self.n_cls_out if rank else self.n_embd
        parts = self._run(toks, width)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if dim is not None and dim < width:
            out = np.ascontiguousarray(out[:, :dim])
        return _normalize(out, mode, pp)

    def embed_tokens(self, texts: Sequence[str], *, normalize: Normalize = "auto", p: float | None = None,
                     dim: int | None = None, prefix: str | None = None, truncate: bool = False) -> list[np.ndarray]:
        """Per-token embeddings (pooling none): one float32 array (n_tokens_i, dim or n_embd) per text, L2 by default."""
        if self.pooling != "none":
            raise InvalidInputError(f"embed_tokens needs pooling='none' (this Embedder pools with {self.pooling!r})")
        mode, pp = _norm_mode(normalize, p)
        self._check_dim(dim)
        toks = self.tokenize(texts, prefix=prefix, truncate=truncate)
        out: list[np.ndarray] = []
        i = 0
        for part in self._run(toks, self.n_embd):
            if dim is not None and dim < self.n_embd:
                part = np.ascontiguousarray(part[:, :dim])
            part = _normalize(part, mode, pp)
            pos = 0
            while pos < part.shape[0]:
                m = toks[i].size
                out.append(part[pos: pos + m])
                pos += m
                i += 1
        return out

    def embed_queries(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        """embed() with ``query_prefix`` prepended to each text."""
        return self.embed(texts, prefix=self.query_prefix, **kw)

    def embed_documents(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        """embed() with ``document_prefix`` prepended to each text."""
        return self.embed(texts, prefix=self.document_prefix, **kw)

    # -- reranking -------------------------------------------------------------------------------
    def rerank_tokens(self, query: str, documents: Sequence[str]) -> list[np.ndarray]:
        """The (query, document) inputs as llama.cpp's embedding tool builds them for rank pooling."""
        if not isinstance(query, str) or not query:
            raise InvalidInputError("query must be a non-empty str")
        docs = _check_texts(documents)
        template = self.model.chat_template("rerank")
        v = self.vocab
        if template is not None:
            prompts = [template.replace("{query}", query).replace("{document}", d) for d in docs]
        else:
            sep = ""
            if v.add_eos and v.eos is not None:
                sep += v.text(v.eos)
            if bool(lib.llama_vocab_get_add_sep(v.ptr)) and v.sep is not None:
                sep += v.text(v.sep)
            prompts = [query + sep + d for d in docs]
        return [v.tokenize(pr, True, True) for pr in prompts]

    def scores(self, query: str, documents: Sequence[str], *, truncate: bool = False) -> np.ndarray:
        """Raw rank-pooling outputs for each (query, document): float32 (n_documents, n_cls_out)."""
        if self.pooling != "rank":
            raise InvalidInputError(f"reranking needs pooling='rank' (this Embedder pools with {self.pooling!r})")
        toks = self._fit(self.rerank_tokens(query, documents), truncate)
        parts = self._run(toks, self.n_cls_out)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None, *,
               truncate: bool = False) -> list[RerankResult]:
        """Score documents against the query (first classifier output), best first, at most ``top_n``."""
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise InvalidInputError(f"top_n must be an int >= 1 or None, not {top_n!r}")
        docs = _check_texts(documents)
        s = self.scores(query, docs, truncate=truncate)[:, 0]
        order = np.argsort(-s, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [RerankResult(int(i), float(s[i]), docs[i]) for i in order]


class Reranker(Embedder):
    """An Embedder with rank pooling: ``Reranker(model).rerank(query, documents, top_n=3)``."""

    def __init__(self, source: Model | Context | str | os.PathLike, **kw: Any) -> None:
        if not isinstance(source, Context):
            kw.setdefault("pooling", "rank")
        super().__init__(source, **kw)
        if self.pooling != "rank":
            self.close()
            raise InvalidInputError(f"a Reranker needs rank pooling, the context pools with {self.pooling!r}")
