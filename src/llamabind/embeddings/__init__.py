"""Embeddings and reranking over a context in embedding mode.

``Embedder(model)`` owns a context made for embeddings (all sequences in one unified KV
cache, up to ``llama_max_parallel_sequences()`` texts per batch) and turns texts into
float32 numpy arrays:

    emb = Embedder()                         # the default model, all-MiniLM-L6-v2 (see convert.py)
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

from .convert import convert_bert, default_embedding_model_path
from .embedder import Embedder
from .facts import Embeddings, RerankResult, is_reranker
from .normalize import NORMALIZE, POOLING, normalize
from .reranker import Reranker

__all__ = ["Embedder", "convert_bert", "default_embedding_model_path", "Embeddings", "Reranker", "RerankResult", "normalize", "is_reranker", "POOLING", "NORMALIZE"]
