"""Normalisations as llama.cpp's ``common_embd_normalize`` does them, and the pooling names."""

from __future__ import annotations

from typing import Union

import numpy as np

from ..errors import InvalidInputError
from ..raw import lib

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
