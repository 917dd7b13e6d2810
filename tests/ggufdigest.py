"""A digest of what a GGUF holds for llama.cpp: its keys and values (less the descriptive
``general.*`` ones a converter guesses from directory names and model cards) and every tensor's
name, type, shape and bytes. Two files with one digest load as the same model.

``python ggufdigest.py FILE.gguf`` prints it (how tests/test_embed_default.py's references were made).
"""

from __future__ import annotations

import hashlib
import sys

import gguf
import numpy as np

DESCRIPTIVE = ("general.name", "general.organization", "general.size_label", "general.basename",
               "general.finetune", "general.license", "general.tags", "general.languages")


def gguf_digest(path: str) -> str:
    r = gguf.GGUFReader(path)
    h = hashlib.sha256()
    for f in sorted(r.fields.values(), key=lambda f: f.name):
        if f.name.startswith("GGUF.") or f.name in DESCRIPTIVE:
            continue
        h.update(f"{f.name}={[t.name for t in f.types]}={f.contents()!r}\n".encode())
    for t in r.tensors:
        h.update(f"{t.name}:{t.tensor_type.name}:{[int(s) for s in t.shape]}\n".encode())
        h.update(np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(gguf_digest(p), p)
