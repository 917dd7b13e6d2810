"""The Reranker: query/document scores from a rank-pooling (classification head) model."""

from __future__ import annotations

import os
from typing import Any

from ..context import Context
from ..errors import InvalidInputError
from ..model import Model
from .embedder import Embedder


class Reranker(Embedder):
    """An Embedder with rank pooling: ``Reranker(model).rerank(query, documents, top_n=3)``."""

    def __init__(self, source: Model | Context | str | os.PathLike, **kw: Any) -> None:
        if not isinstance(source, Context):
            kw.setdefault("pooling", "rank")
        super().__init__(source, **kw)
        if self.pooling != "rank":
            self.close()
            raise InvalidInputError(f"a Reranker needs rank pooling, the context pools with {self.pooling!r}")
