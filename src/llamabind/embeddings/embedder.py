"""The Embedder: texts to float32 arrays over a context in embedding mode, batched by sequence."""

from __future__ import annotations

import os
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from ..batch import Batch
from ..context import Context
from ..errors import ContextOverflowError, InvalidInputError
from ..model import Model
from ..raw import ffi, lib
from .convert import default_embedding_model_path
from .facts import Embeddings, RerankResult, _check_texts, _pooling_id, is_reranker
from .normalize import _NO_RERANKER, _POOLING_NAMES, Normalize, _norm_mode, _normalize

# -- the embedder --------------------------------------------------------------------------------

class Embedder:
    """Embeddings (and rerank scores) from a model, over a context in embedding mode.

    ``source`` is a Model (a context is made and owned: unified KV cache, ``n_seq_max``
    sequences per batch), a GGUF path (the model is loaded and owned too), an existing
    Context created with ``embeddings=True`` (used as it is), or None: the default model,
    all-MiniLM-L6-v2 (``convert.default_embedding_model_path``). ``pooling``: ``none``,
    ``mean``, ``cls``, ``last``, ``rank`` or None for the model's default. Extra keyword
    arguments go to Context (``flash_attn``, ``type_k``, ...) or, for a path, to Model.
    """

    def __init__(self, source: Model | Context | str | os.PathLike | None = None, *, pooling: str | int | None = None,
                 n_ctx: int | None = None, n_batch: int | None = None, n_seq_max: int | None = None,
                 n_threads: int | None = None, query_prefix: str = "", document_prefix: str = "",
                 parse_special: bool = False, **params: Any) -> None:
        self._own_model = self._own_ctx = False
        if source is None:
            source = default_embedding_model_path()
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
            with ctx.lease() as lease, ctx.hold(lease):  # BusyError while a generation (or another Embedder) drives it
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
        return self.embed_with_usage(texts, normalize=normalize, p=p, dim=dim, prefix=prefix,
                                     truncate=truncate).vectors

    def embed_with_usage(self, texts: Sequence[str], *, normalize: Normalize = "auto", p: float | None = None,
                         dim: int | None = None, prefix: str | None = None, truncate: bool = False) -> Embeddings:
        """``embed()``, with the number of tokens each text became (``.n_tokens``, ``.total_tokens``)."""
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
        return Embeddings(_normalize(out, mode, pp), tuple(t.size for t in toks))

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
