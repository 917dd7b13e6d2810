"""What a model offers for embeddings: pooling ids, whether it is a reranker, checked texts, rerank hits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError, ModelLoadError
from ..gguf_check import check_gguf
from ..model import Model
from ..raw import lib
from .normalize import _POOLING_IDS, _POOLING_NAMES, POOLING

# -- model facts ---------------------------------------------------------------------------------

def _gguf_tensor_names(path: str) -> frozenset[str]:
    """Names of the tensors in a GGUF file (from the validator's walk; empty if it is not sound)."""
    try:
        return check_gguf(path)
    except ModelLoadError:
        return frozenset()


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


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Pooled vectors, and how many tokens each text became (prefix included, after truncation):
    what an embeddings API reports as its input usage."""

    vectors: np.ndarray
    n_tokens: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One document of a rerank: its position in the input, its score and its text."""

    index: int
    score: float
    document: str
