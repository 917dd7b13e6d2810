"""Tiny random GGUF models for tests, written with the PyPI ``gguf`` package.

``write_tiny_llama`` makes a ~0.5 MB llama-architecture model that llama.cpp loads and
runs: random (deterministic) weights, a byte-fallback SentencePiece vocabulary, and a
chatml chat template.  Its output is noise, but reproducible noise.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

# llama.cpp token types (llama.h enum llama_token_type / gguf TokenType)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# multi-character pieces so that common text does not tokenize byte by byte
_WORDS = ["he", "ll", "lo", "hel", "llo", "hello", "▁hello", "wor", "rld", "world", "▁world",
          "▁the", "▁a", "in", "er", "on", "an", "▁is", "▁of", "▁and"]


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """The vocabulary: <unk> <s> </s>, the 256 byte tokens, printable ASCII, a few words,
    then <|im_start|> <|im_end|>.  Returns (tokens, scores, token types)."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    chars = ["▁"] + [chr(c) for c in range(0x21, 0x7F)]  # SentencePiece writes a space as ▁
    tokens += chars + _WORDS
    types += [NORMAL] * (len(chars) + len(_WORDS))
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [CONTROL, CONTROL]
    # SPM merges the pair whose result has the highest score: prefer longer pieces
    scores = [float(len(t)) if ty == NORMAL else 0.0 for t, ty in zip(tokens, types)]
    return tokens, scores, types


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    f16: bool = False,
    template: str | None = CHATML_TEMPLATE,
    vocab_from: str | os.PathLike[str] | None = None,
    metadata: dict[str, str | int | float] | None = None,
) -> str:
    """Write a random llama model to ``path`` and return the path (as a str).

    Matrices are ``normal * 0.02`` (f32, or f16 with ``f16=True``), norms are ones;
    the same arguments always give the same bytes. ``vocab_from``: a GGUF (such as
    llama.cpp's ``models/ggml-vocab-*.gguf``) whose tokenizer the model takes instead of
    the tiny one; ``template``: the chat template stored (None: none); ``metadata``: more
    keys (str, int as uint32, float as float32), such as ``general.sampling.temp``.
    """
    path = os.fspath(path)
    tokens, scores, types = tiny_vocab()
    copied = _tokenizer_fields(vocab_from) if vocab_from is not None else None
    n_vocab = len(copied["tokenizer.ggml.tokens"][1]) if copied else len(tokens)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)
    wtype = np.float16 if f16 else np.float32

    def mat(n_out: int, n_in: int) -> np.ndarray:
        # numpy shape (rows, cols) is ggml ne = [cols, rows]: ne[0] is the input dim
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02).astype(wtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama-random")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)

    if copied:
        for key, (vtype, value, sub) in copied.items():
            w.add_key_value(key, value, vtype, sub_type=sub)
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_eot_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    if template is not None:
        w.add_chat_template(template)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(n_head * head_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_head * head_dim))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", mat(n_vocab, n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _tokenizer_fields(path: str | os.PathLike[str]) -> dict:
    """The ``tokenizer.ggml.*`` key-values of a GGUF: {key: (type, value, array item type)}.

    Read directly (gguf.GGUFReader maps every array item and takes seconds on a 150k vocabulary)."""
    import struct

    data = open(path, "rb").read()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos = 24

    def string() -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8", "surrogateescape")

    def value(t: int):
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub == 8:
                return [string() for _ in range(n)]
            fmt = _SCALARS[sub]
            size = struct.calcsize(fmt)
            items = list(struct.unpack_from("<" + fmt[1] * n, data, pos))
            pos += size * n
            return items
        fmt = _SCALARS[t]
        v = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    out = {}
    for _ in range(n_kv):
        key = string()
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        sub = struct.unpack_from("<I", data, pos)[0] if t == 9 else None
        v = value(t)
        if key.startswith("tokenizer.ggml."):
            out[key] = (gguf.GGUFValueType(t), v, gguf.GGUFValueType(sub) if sub is not None else None)
    return out


def write_tiny_lora(path: str | os.PathLike, *, n_embd: int = 64, n_layer: int = 2, rank: int = 4,
                    alpha: float = 8.0, seed: int = 1) -> str:
    """A LoRA adapter for ``write_tiny_llama``'s model: low-rank deltas on every attn_q/attn_output."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for i in range(n_layer):
        for name in ("attn_q", "attn_output"):
            base = f"blk.{i}.{name}.weight"
            # ggml shapes: lora_a [n_in, r], lora_b [r, n_out]; numpy arrays are reversed
            w.add_tensor(base + ".lora_a", (rng.standard_normal((rank, n_embd)) * 0.5).astype(np.float32))
            w.add_tensor(base + ".lora_b", (rng.standard_normal((n_embd, rank)) * 0.5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
