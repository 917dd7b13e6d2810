"""check_gguf: valid files pass, hand-made corruptions raise ModelLoadError with a clear message."""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import _missing

from llamabind.errors import ModelLoadError, ModelNotFoundError
from llamabind.gguf_check import GGML_TYPES, check_gguf
from tinymodels import write_tiny_llama


class Layout:
    """Byte offsets of the fields of a GGUF file, found with gguf.GGUFReader."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = Path(path).stat().st_size
        r = gguf.GGUFReader(path)
        self.fields = r.fields
        self.tensors = r.tensors
        self.data_start = r.data_offset

    @staticmethod
    def _part(field: gguf.ReaderField, i: int) -> int:
        return field.offset + sum(p.nbytes for p in field.parts[:i])

    def kv(self, key: str, part: int) -> int:
        """Offset of part ``part`` of a KV (0 key len, 1 key, 2 type, 3.. the value)."""
        return self._part(self.fields[key], part)

    def tensor(self, i: int, what: str) -> int:
        """Offset of ``what`` (name_len, n_dims, ne0, type, offset) in tensor info ``i``."""
        index = {"name_len": 0, "n_dims": 2, "ne0": 3, "type": 4, "offset": 5}  # part 3 holds all dims
        return self._part(self.tensors[i].field, index[what])


@pytest.fixture(scope="module")
def layout(tiny_model_path: str) -> Layout:
    return Layout(tiny_model_path)


def corrupt(layout: Layout, tmp_path: Path, *edits: tuple[int, str, int], size: int | None = None) -> str:
    """A copy of the tiny model with ``struct.pack_into(fmt, offset, value)`` edits, cut to ``size``."""
    data = bytearray(Path(layout.path).read_bytes())
    for offset, fmt, value in edits:
        struct.pack_into(fmt, data, offset, value)
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data[:size]))
    return str(out)


def assert_rejected(path: str, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as e:
        check_gguf(path)
    msg = str(e.value)
    assert path in msg and "\n" not in msg
    for fragment in fragments:
        assert fragment in msg
    return msg


# -- valid files ---------------------------------------------------------------------


def test_tiny_model_passes(tiny_model_path: str) -> None:
    check_gguf(tiny_model_path)
    check_gguf(Path(tiny_model_path))


def test_f16_model_passes(tmp_path: Path) -> None:
    check_gguf(write_tiny_llama(tmp_path / "f16.gguf", f16=True, seed=1))


def test_custom_alignment_and_quantized_types_pass(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    w.add_custom_alignment(64)
    w.add_tensor("a", np.zeros((3, 32), np.float32))
    # raw q8_0 data: 2 rows of 64 elements = 2 blocks of 34 bytes per row
    w.add_tensor("b", np.zeros((2, 68), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", np.zeros((5,), np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_gguf(tmp_path / "q.gguf")


def test_no_tensors_passes(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    check_gguf(tmp_path / "vocab.gguf")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        check_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError):
        check_gguf(tmp_path)  # a directory


# -- header ----------------------------------------------------------------------------


def test_bad_magic(layout: Layout, tmp_path: Path) -> None:
    assert_rejected(corrupt(layout, tmp_path, (0, "4s", b"GGML")), "bad magic")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_bad_version(layout: Layout, tmp_path: Path, version: int) -> None:
    assert_rejected(corrupt(layout, tmp_path, (4, "<I", version)), f"version {version}")


@pytest.mark.parametrize("count, value", [("n_tensors", 1 << 40), ("n_tensors", -1), ("n_kv", 1 << 40), ("n_kv", -5)])
def test_impossible_counts(layout: Layout, tmp_path: Path, count: str, value: int) -> None:
    offset = 8 if count == "n_tensors" else 16
    assert_rejected(corrupt(layout, tmp_path, (offset, "<q", value)), "count", str(value))


def test_more_tensors_than_listed(layout: Layout, tmp_path: Path) -> None:
    n = len(layout.tensors)
    assert_rejected(corrupt(layout, tmp_path, (8, "<q", n + 1)))


# -- truncation ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["empty", "mid_header", "header_only", "mid_key", "mid_token_list",
                                   "mid_tensor_infos", "before_data", "last_byte"])
def test_truncated(layout: Layout, tmp_path: Path, where: str) -> None:
    size = {
        "empty": 0,
        "mid_header": 13,
        "header_only": 24,
        "mid_key": layout.kv("general.architecture", 1) + 3,
        "mid_token_list": layout.kv("tokenizer.ggml.tokens", 6) + 1000,
        "mid_tensor_infos": layout.tensor(5, "type") + 2,
        "before_data": layout.data_start,
        "last_byte": layout.size - 1,
    }[where]
    msg = assert_rejected(corrupt(layout, tmp_path, size=size), "truncated")
    if where in ("before_data", "last_byte"):
        last = layout.tensors[0 if where == "before_data" else -1].name
        assert f"tensor '{last}' data ends at byte" in msg and f"file has {size} bytes" in msg


def test_string_length_past_eof(layout: Layout, tmp_path: Path) -> None:
    offset = layout.kv("general.architecture", 3)  # length of the value string
    assert_rejected(corrupt(layout, tmp_path, (offset, "<Q", layout.size)), "general.architecture", "length")


def test_huge_string_length(layout: Layout, tmp_path: Path) -> None:
    assert_rejected(corrupt(layout, tmp_path, (layout.kv("general.name", 0), "<Q", 1 << 63)), "key", "length")


def test_token_array_length_past_eof(layout: Layout, tmp_path: Path) -> None:
    offset = layout.kv("tokenizer.ggml.tokens", 4)  # array length
    assert_rejected(corrupt(layout, tmp_path, (offset, "<Q", 10**8)), "tokenizer.ggml.tokens")


def test_string_in_array_past_eof(layout: Layout, tmp_path: Path) -> None:
    offset = layout.kv("tokenizer.ggml.tokens", 5)  # length of the first token
    assert_rejected(corrupt(layout, tmp_path, (offset, "<Q", layout.size)), "tokenizer.ggml.tokens", "past the end")


# -- key/value table -----------------------------------------------------------------


@pytest.mark.parametrize("vtype", [13, -1, 1000])
def test_unknown_value_type(layout: Layout, tmp_path: Path, vtype: int) -> None:
    offset = layout.kv("general.architecture", 2)
    assert_rejected(corrupt(layout, tmp_path, (offset, "<i", vtype)), "unknown value type")


@pytest.mark.parametrize("etype", [9, 13, -2])
def test_bad_array_element_type(layout: Layout, tmp_path: Path, etype: int) -> None:
    offset = layout.kv("tokenizer.ggml.scores", 3)
    assert_rejected(corrupt(layout, tmp_path, (offset, "<i", etype)), "array element type")


def test_empty_key(layout: Layout, tmp_path: Path) -> None:
    assert_rejected(corrupt(layout, tmp_path, (layout.kv("general.name", 0), "<Q", 0)))


def test_duplicate_key(layout: Layout, tmp_path: Path) -> None:
    # overwrite a key with another key of the same length
    k1, k2 = next((k1, k2) for k1 in layout.fields for k2 in layout.fields
                  if k1 < k2 and len(k1) == len(k2) and not k1.startswith("GGUF."))
    out = corrupt(layout, tmp_path, (layout.kv(k2, 1), f"{len(k1)}s", k1.encode()))
    assert_rejected(out, "duplicate key", k1)


@pytest.mark.parametrize("value, fragment", [(48, "power of 2"), (0, "power of 2")])
def test_bad_alignment(tmp_path: Path, value: int, fragment: str) -> None:
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    w.add_uint32("general.alignment", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert_rejected(str(tmp_path / "a.gguf"), "general.alignment", fragment)


def test_alignment_wrong_type(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    w.add_uint64("general.alignment", 32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert_rejected(str(tmp_path / "a.gguf"), "general.alignment", "u32")


# -- tensor infos ----------------------------------------------------------------------


@pytest.mark.parametrize("gtype", [4, 5, 31, 36, 43, 100, -1])
def test_bad_tensor_type(layout: Layout, tmp_path: Path, gtype: int) -> None:
    offset = layout.tensor(2, "type")
    assert_rejected(corrupt(layout, tmp_path, (offset, "<i", gtype)), layout.tensors[2].name, f"type {gtype}")


def test_row_not_multiple_of_block(layout: Layout, tmp_path: Path) -> None:
    offset = layout.tensor(2, "type")  # a [64, 64] f32 tensor becomes q4_K (256 per block)
    assert_rejected(corrupt(layout, tmp_path, (offset, "<i", 12)), "multiple of 256")


def test_misaligned_offset(layout: Layout, tmp_path: Path) -> None:
    offset = layout.tensor(3, "offset")
    value = int(layout.tensors[3].data_offset - layout.data_start) + 4
    assert_rejected(corrupt(layout, tmp_path, (offset, "<Q", value)), layout.tensors[3].name, "alignment")


def test_offset_out_of_order(layout: Layout, tmp_path: Path) -> None:
    offset = layout.tensor(3, "offset")
    value = int(layout.tensors[3].data_offset - layout.data_start) + 32
    assert_rejected(corrupt(layout, tmp_path, (offset, "<Q", value)), layout.tensors[3].name, "expected")


def test_tensor_data_past_eof(layout: Layout, tmp_path: Path) -> None:
    last = layout.tensors[-1]  # output.weight [64, n_vocab]: make it [64, 10**6]
    offset = layout.tensor(len(layout.tensors) - 1, "ne0") + 8
    assert_rejected(corrupt(layout, tmp_path, (offset, "<q", 10**6)),
                    "truncated", f"tensor '{last.name}' data ends at byte")


@pytest.mark.parametrize("n_dims", [0, 5, 1 << 31])
def test_bad_n_dims(layout: Layout, tmp_path: Path, n_dims: int) -> None:
    offset = layout.tensor(0, "n_dims")
    assert_rejected(corrupt(layout, tmp_path, (offset, "<I", n_dims)), "dimensions")


def test_negative_dim(layout: Layout, tmp_path: Path) -> None:
    assert_rejected(corrupt(layout, tmp_path, (layout.tensor(2, "ne0"), "<q", -64)), "negative")


def test_dims_overflow(layout: Layout, tmp_path: Path) -> None:
    ne0 = layout.tensor(2, "ne0")
    assert_rejected(corrupt(layout, tmp_path, (ne0, "<q", 1 << 40), (ne0 + 8, "<q", 1 << 40)), "INT64_MAX")


def test_duplicate_tensor_name(layout: Layout, tmp_path: Path) -> None:
    # blk.0.ffn_up.weight -> blk.1.ffn_up.weight, which already exists
    names = [t.name for t in layout.tensors]
    i = names.index("blk.1.ffn_up.weight")
    offset = layout.tensor(i, "name_len") + 8
    assert_rejected(corrupt(layout, tmp_path, (offset, "5s", b"blk.0")), "duplicate tensor name")


def test_name_too_long(layout: Layout, tmp_path: Path) -> None:
    # lengthen the first tensor name so that it swallows the following bytes
    assert_rejected(corrupt(layout, tmp_path, (layout.tensor(0, "name_len"), "<Q", 64)), "maximum is 63")


# -- values llama.cpp asserts on instead of rejecting the file ------------------------------


def token_text(layout: Layout, i: int) -> int:
    """Offset of the bytes of token ``i`` (tokens array parts: 5 + 2i length, 6 + 2i bytes)."""
    return layout.kv("tokenizer.ggml.tokens", 6 + 2 * i)


def test_duplicate_token(layout: Layout, tmp_path: Path) -> None:
    tokens = layout.fields["tokenizer.ggml.tokens"]
    assert bytes(tokens.parts[6 + 2 * 4]) == b"<0x01>"
    out = corrupt(layout, tmp_path, (token_text(layout, 4), "6s", b"<0x00>"))
    assert_rejected(out, "tokenizer.ggml.tokens", "token 4 '<0x00>' repeats token 3")


@pytest.mark.parametrize("n_layer", [0, 513, 0xFFFFFFFF])
def test_bad_block_count(layout: Layout, tmp_path: Path, n_layer: int) -> None:
    out = corrupt(layout, tmp_path, (layout.kv("llama.block_count", 3), "<I", n_layer))
    assert_rejected(out, "llama.block_count", f"{n_layer} layers")


@pytest.mark.parametrize("eps", [float("nan"), -1e-5])
def test_bad_norm_epsilon(layout: Layout, tmp_path: Path, eps: float) -> None:
    out = corrupt(layout, tmp_path, (layout.kv("llama.attention.layer_norm_rms_epsilon", 3), "<f", eps))
    assert_rejected(out, "layer_norm_rms_epsilon", "not >= 0")


@pytest.mark.parametrize("key, value, fragment", [("nextn_predict_layers", 3, "more than the 2 layers"),
                                                  ("expert_count", 1025, "maximum is 1024")])
def test_bad_layer_and_expert_counts(tmp_path: Path, key: str, value: int, fragment: str) -> None:
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "qwen3moe")
    w.add_block_count(2)
    w.add_uint32(f"qwen3moe.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert_rejected(str(tmp_path / "m.gguf"), f"qwen3moe.{key}", fragment)


@pytest.mark.parametrize("tensor, gtype", [("output.weight", 9), ("blk.0.attn_q.weight", 26),
                                           ("blk.1.ffn_norm.weight", 24), ("token_embd.weight", 28)])
def test_type_that_cannot_compute(layout: Layout, tmp_path: Path, tensor: str, gtype: int) -> None:
    """Types llama.cpp loads but then crashes on (found by test_fuzz_gguf against llama-simple)."""
    i = [t.name for t in layout.tensors].index(tensor)
    out = corrupt(layout, tmp_path, (layout.tensor(i, "type"), "<i", gtype))
    assert_rejected(out, tensor, "cannot be computed with")


def test_integer_table_tensor_passes(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "deepseek4")
    w.add_tensor("blk.0.ffn_gate_tid2eid.weight", np.zeros((4, 8), np.int32))
    w.add_tensor("d2t", np.zeros(16, np.int64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_gguf(tmp_path / "t.gguf")


def test_recheck_sees_in_place_change(layout: Layout, tmp_path: Path) -> None:
    """A file found valid, then damaged in place (same inode, size and mtime), is rejected."""
    path = tmp_path / "model.gguf"
    shutil.copy(layout.path, path)
    check_gguf(path)
    check_gguf(path)  # the cached verdict
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(layout.kv("llama.block_count", 3))
        f.write(struct.pack("<I", 0))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_rejected(str(path), "llama.block_count")


# -- the type table against the built ggml ------------------------------------------------


@pytest.mark.oracle
def test_type_table_matches_ggml(tools_dir: Path) -> None:
    libs = sorted(tools_dir.glob("libggml-base.*")) + sorted(tools_dir.parent.glob("**/libggml-base.*"))
    if not libs:
        _missing("libggml-base not found next to the native tools")
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_name.restype = ctypes.c_char_p
    for t in range(max(GGML_TYPES) + 1):  # no further: ggml does not bound-check the type
        blck = lib.ggml_blck_size(t)
        if blck == 0:
            assert t not in GGML_TYPES
        else:
            name = lib.ggml_type_name(t).decode()
            assert GGML_TYPES[t] == (name, blck, lib.ggml_type_size(t)), t


def test_file_unchanged(layout: Layout, tmp_path: Path) -> None:
    """check_gguf only reads: a copy checked twice stays byte-identical."""
    copy = tmp_path / "copy.gguf"
    shutil.copy(layout.path, copy)
    check_gguf(copy)
    check_gguf(copy)
    assert copy.read_bytes() == Path(layout.path).read_bytes()
