"""Validate a GGUF file in pure Python before llama.cpp reads it.

llama.cpp's GGUF reader (vendor/llama.cpp/ggml/src/gguf.cpp) rejects malformed metadata
cleanly, but the model loader and the compute kernels behind it abort (GGML_ASSERT) or
crash on some files the reader accepts.  ``check_gguf`` walks the header, the key/value
table and the tensor-info table (never the tensor data) through an mmap, mirrors every
check of gguf.cpp (plus: 1 to 4 dimensions, tensor data inside the file), and rejects
what the fuzz in tests/test_fuzz_gguf.py found crashing llama.cpp: a repeated token in
the vocabulary, a block count outside 1..512, a NaN or negative norm epsilon, and weights
of a type no kernel computes with.  It raises ``ModelLoadError`` with one line naming the
file and the problem.

Cost: the Python loop over the vocabulary dominates (each token is sliced out to look for
repeats): ~0.3 ms for the tiny test model, 0.1-0.25 s for a 262k-token vocabulary (gemma3)
on a busy 2-core machine.  A recheck of an unchanged file (same device, inode and size)
only checksums its metadata: ~5 ms for that vocabulary.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from itertools import repeat

from .errors import ModelLoadError, ModelNotFoundError

__all__ = ["check_gguf", "GGML_TYPES"]

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_STRING_LENGTH = 1 << 30  # gguf.cpp GGUF_MAX_STRING_LENGTH
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30  # gguf.cpp GGUF_MAX_ARRAY_ELEMENTS
GGML_MAX_NAME = 64  # ggml.h: a tensor name holds at most 63 bytes
GGML_MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1
HEADER_SIZE = 24  # magic, version u32, n_tensors i64, n_kv i64

# llama.cpp limits it asserts on (abort) instead of rejecting the file (llama-hparams.h)
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024

# GGUF value types (gguf.h enum gguf_type): code -> (name, struct format; "" if not fixed-size).
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
GGUF_TYPES: dict[int, tuple[str, str]] = {
    0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"),
    5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "<B"), 8: ("str", ""), 9: ("arr", ""),
    10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d"),
}

# ggml types a GGUF file may hold: code -> (name, block size, bytes per block), as
# ggml_type_name/ggml_blck_size/ggml_type_size report them for the vendored ggml.
# Absent codes (4, 5, 31-33, 36-38) were removed from ggml and are rejected, like
# codes >= GGML_TYPE_COUNT (43).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 36),
    10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110), 12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176), 14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74), 18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50), 20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136), 24: ("i8", 1, 1), 25: ("i16", 1, 2),
    26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8), 29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54), 35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17), 40: ("nvfp4", 64, 36), 41: ("q1_0", 128, 18), 42: ("q2_0", 64, 18),
}

# ggml types a file may hold but that no ggml CPU kernel computes with: q8_1 and q8_K are the
# activation types of quantized dot products (no converter writes them), and integer/f64
# tensors only serve as tables (e.g. DeepSeek-V4 routing); llama.cpp loads a model with such
# a weight and then crashes (SIGSEGV or abort) at the first decode
ACTIVATION_TYPES = {9, 15}  # q8_1, q8_K
TABLE_TYPES = {24, 25, 26, 27, 28}  # i8, i16, i32, i64, f64
# the standard llama.cpp tensors that are always float or quantized weights
FLOAT_WEIGHT = re.compile(
    rb"(token_embd|output|output_norm|blk\.\d+\.(attn_(q|k|v|qkv|output|norm|q_norm|k_norm)"
    rb"|ffn_(gate|up|down|norm|gate_inp|gate_exps|up_exps|down_exps)))\.weight")

_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_I64 = struct.Struct("<q").unpack_from
_HEADER = struct.Struct("<4sIqq").unpack_from


# files found valid: (device, inode, size) -> (end of the metadata, its CRC-32); a recheck of
# an unchanged file only checksums the metadata (the verdict depends on nothing else)
_valid: dict[tuple[int, int, int], tuple[int, int, frozenset[str]]] = {}


class _Bad(Exception):
    """A structural problem; check_gguf turns it into ModelLoadError."""


def check_gguf(path: str | os.PathLike[str]) -> frozenset[str]:
    """Raise ModelLoadError (ModelNotFoundError if missing) unless ``path`` is a well-formed GGUF file;
    return the names of its tensors."""
    name = os.fspath(path)
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file not found: {name!r}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot open model file {name!r}: {e.strerror or e}") from None
    with f:
        try:
            st = os.fstat(f.fileno())
            size = st.st_size
            if size < HEADER_SIZE:
                raise _Bad(f"truncated: file has {size} bytes, the GGUF header alone needs {HEADER_SIZE}")
            identity = (st.st_dev, st.st_ino, size)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                known = _valid.get(identity)
                if known and zlib.crc32(buf[:known[0]]) == known[1]:
                    return known[2]
                parser = _Parser(buf, size)
                end = parser.check()
                if len(_valid) >= 64:
                    _valid.clear()
                names = frozenset(parser.names)
                _valid[identity] = (end, zlib.crc32(buf[:end]), names)
                return names
        except _Bad as e:
            raise ModelLoadError(f"invalid GGUF file {name!r}: {e}") from None
        except (struct.error, OverflowError) as e:  # not expected: every read is bounds-checked
            raise ModelLoadError(f"invalid GGUF file {name!r}: malformed metadata ({e})") from None
        except (OSError, ValueError) as e:  # mmap of a special file, I/O error
            raise ModelLoadError(f"cannot read model file {name!r}: {e}") from None


class _Parser:
    """Walks the metadata of one GGUF file held in ``buf`` (``size`` bytes)."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.names: list[str] = []
        self.buf = buf
        self.size = size
        self.pos = 0
        self.where = "header"

    # -- primitives: each checks that it stays inside the file ---------------------

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Bad(f"truncated: {self.where}: {what} needs {n} bytes at offset {self.pos}"
                       f" but the file has {self.size} bytes")

    def _num(self, unpack, size: int, what: str) -> int:
        self._need(size, what)
        v = unpack(self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self._num(_U32, 4, what)

    def i32(self, what: str) -> int:
        return self._num(_I32, 4, what)

    def u64(self, what: str) -> int:
        return self._num(_U64, 8, what)

    def i64(self, what: str) -> int:
        return self._num(_I64, 8, what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        if n > GGUF_MAX_STRING_LENGTH:
            raise _Bad(f"{self.where}: {what} length {n} exceeds the maximum {GGUF_MAX_STRING_LENGTH}")
        if n > self.size - self.pos:
            raise _Bad(f"truncated: {self.where}: {what} length {n} exceeds the"
                       f" {self.size - self.pos} bytes left in the file")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    # -- sections --------------------------------------------------------------------

    def check(self) -> int:
        """Check everything; return where the metadata ends."""
        magic, version, n_tensors, n_kv = _HEADER(self.buf, 0)
        self.pos = HEADER_SIZE
        if magic != GGUF_MAGIC:
            raise _Bad(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        if version not in GGUF_VERSIONS:
            hint = " (byte order of another machine?)" if version & 0xFFFF == 0 and version else ""
            raise _Bad(f"unsupported GGUF version {version}{hint}, expected 2 or 3")
        left = self.size - HEADER_SIZE
        # smallest KV: 8-byte length, 1-byte key, 4-byte type, 1-byte value;
        # smallest tensor info: 8-byte length, empty name, n_dims, 1 dim, type, offset
        if not 0 <= n_tensors <= left // 32:
            raise _Bad(f"tensor count {n_tensors} impossible for a file of {self.size} bytes")
        if not 0 <= n_kv <= left // 14 or n_kv * 14 + n_tensors * 32 > left:
            raise _Bad(f"key/value count {n_kv} impossible for a file of {self.size} bytes")
        alignment = self.check_kv(n_kv)
        self.check_tensors(n_tensors, alignment)
        return self.pos

    def check_kv(self, n_kv: int) -> int:
        """Walk the key/value table; return general.alignment (or the default)."""
        alignment = GGUF_DEFAULT_ALIGNMENT
        seen: set[bytes] = set()
        values: dict[bytes, int | float | bytes] = {}  # scalars and short strings, for check_values
        for i in range(n_kv):
            self.where = f"key/value {i}"
            key = self.string("key")
            if not key:
                raise _Bad(f"{self.where}: empty key")
            self.where = f"key/value {i} ({_show(key)})"
            if key in seen:
                raise _Bad(f"{self.where}: duplicate key")
            seen.add(key)
            vtype = self.i32("value type")
            if vtype not in GGUF_TYPES:
                raise _Bad(f"{self.where}: unknown value type {vtype}")
            if key == b"general.alignment" and vtype != GGUF_UINT32:
                raise _Bad(f"{self.where}: must be of type u32, not {GGUF_TYPES[vtype][0]}")
            if vtype == GGUF_ARRAY:
                self.check_array(unique=key == b"tokenizer.ggml.tokens")
            elif vtype == GGUF_STRING:
                value = self.string("value")
                if len(value) <= 64:
                    values[key] = value
            else:
                fmt = GGUF_TYPES[vtype][1]
                self._need(struct.calcsize(fmt), "value")
                values[key] = struct.unpack_from(fmt, self.buf, self.pos)[0]
                self.pos += struct.calcsize(fmt)
        if b"general.alignment" in values:
            alignment = int(values[b"general.alignment"])
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"key 'general.alignment': alignment {alignment} is not a power of 2")
        self.check_values(values)
        return alignment

    def check_values(self, values: dict[bytes, int | float | bytes]) -> None:
        """Reject the values llama.cpp's model loader asserts on (an abort, not an error)."""
        arch = values.get(b"general.architecture")
        if not isinstance(arch, bytes):
            return  # llama.cpp refuses a file without an architecture cleanly

        def get(name: str) -> int | float | None:
            v = values.get(arch + b"." + name.encode())
            return v if isinstance(v, (int, float)) else None

        what = f"key '{arch.decode(errors='replace')}.%s'"
        n_layer = get("block_count")
        if n_layer is not None and not 1 <= n_layer <= LLAMA_MAX_LAYERS:
            raise _Bad(f"{what % 'block_count'}: {n_layer} layers, expected 1 to {LLAMA_MAX_LAYERS}")
        nextn = get("nextn_predict_layers")
        if nextn is not None and n_layer is not None and nextn > n_layer:
            raise _Bad(f"{what % 'nextn_predict_layers'}: {nextn} is more than the {n_layer} layers")
        n_expert = get("expert_count")
        if n_expert is not None and n_expert > LLAMA_MAX_EXPERTS:
            raise _Bad(f"{what % 'expert_count'}: {n_expert} experts, the maximum is {LLAMA_MAX_EXPERTS}")
        for name in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
            eps = get(name)
            if eps is not None and not eps >= 0:  # NaN too: ggml asserts eps >= 0 in every norm
                raise _Bad(f"{what % name}: epsilon {eps} is not >= 0")

    def check_array(self, unique: bool = False) -> None:
        """Walk an array value; with ``unique``, its strings must differ (the vocabulary)."""
        etype = self.i32("array element type")
        if etype not in GGUF_TYPES or etype == GGUF_ARRAY:
            raise _Bad(f"{self.where}: invalid array element type {etype}")
        n = self.u64("array length")
        left = self.size - self.pos
        if n > GGUF_MAX_ARRAY_ELEMENTS:
            raise _Bad(f"{self.where}: array length {n} exceeds the maximum {GGUF_MAX_ARRAY_ELEMENTS}")
        if etype != GGUF_STRING:
            nbytes = n * struct.calcsize(GGUF_TYPES[etype][1])
            if nbytes > left:
                raise _Bad(f"truncated: {self.where}: array of {n} {GGUF_TYPES[etype][0]} needs"
                           f" {nbytes} bytes, {left} left in the file")
            self.pos += nbytes
            return
        if n * 8 > left:
            raise _Bad(f"truncated: {self.where}: array of {n} strings needs at least"
                       f" {n * 8} bytes, {left} left in the file")
        # hot loops (a vocabulary has up to ~10^6 strings), ~100 ns a string: a length that
        # overshoots makes the next unpack_from raise struct.error, or the last one fails below
        buf, pos, size, u64 = self.buf, self.pos, self.size, _U64
        strings: list[bytes] = []
        try:
            if unique:
                add = strings.append
                for _ in repeat(None, n):
                    end = pos + 8 + u64(buf, pos)[0]
                    add(buf[pos + 8:end])
                    pos = end
            else:
                for _ in repeat(None, n):
                    pos += 8 + u64(buf, pos)[0]
        except (struct.error, OverflowError):  # a length field past the end, or beyond 2**63
            pos = size + 1
        if pos > size:
            raise _Bad(f"truncated: {self.where}: string array runs past the end of the file"
                       f" ({size} bytes)")
        self.pos = pos
        if unique and len(set(strings)) != n:
            self.check_unique(strings)

    def check_unique(self, strings: list[bytes]) -> None:
        """Name the first repeated string; llama.cpp aborts on a vocabulary with one."""
        first: dict[bytes, int] = {}
        for i, s in enumerate(strings):
            s = s or b"[EMPTY_%d]" % i  # what llama.cpp makes of an empty token
            if s in first:
                raise _Bad(f"{self.where}: token {i} {_show(s)} repeats token {first[s]}")
            first[s] = i

    def check_tensors(self, n_tensors: int, alignment: int) -> None:
        infos: list[tuple[str, int, int]] = []  # (name, offset, nbytes)
        seen: set[bytes] = set()
        for i in range(n_tensors):
            self.where = f"tensor info {i}"
            raw = self.string("name")
            name = _show(raw)
            if len(raw) >= GGML_MAX_NAME:
                raise _Bad(f"{self.where}: name {name} is {len(raw)} bytes long, the maximum is {GGML_MAX_NAME - 1}")
            self.where = f"tensor {name}"
            if raw in seen:
                raise _Bad(f"{self.where}: duplicate tensor name")
            seen.add(raw)
            self.names.append(raw.decode("utf-8", "replace"))
            n_dims = self.u32("n_dims")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise _Bad(f"{self.where}: {n_dims} dimensions, expected 1 to {GGML_MAX_DIMS}")
            ne = [self.i64(f"dimension {j}") for j in range(n_dims)]
            nelements = 1
            for j, d in enumerate(ne):
                if d < 0:
                    raise _Bad(f"{self.where}: dimension {j} is negative ({d})")
                nelements *= d
            if nelements > INT64_MAX:
                raise _Bad(f"{self.where}: shape {ne} has more than INT64_MAX elements")
            gtype = self.i32("ggml type")
            if gtype not in GGML_TYPES:
                raise _Bad(f"{self.where}: unknown or removed ggml type {gtype}")
            tname, blck, tsize = GGML_TYPES[gtype]
            if gtype in ACTIVATION_TYPES or (gtype in TABLE_TYPES and FLOAT_WEIGHT.fullmatch(raw)):
                raise _Bad(f"{self.where}: type {tname} cannot be computed with (llama.cpp would crash)")
            if ne[0] % blck:
                raise _Bad(f"{self.where}: type {tname} needs rows that are a multiple of {blck}"
                           f" elements, row has {ne[0]}")
            offset = self.u64("data offset")
            infos.append((name, offset, nelements // blck * tsize))
        if not infos:
            return
        data_start = -(-self.pos // alignment) * alignment
        expected = 0  # gguf.cpp requires the data of tensor i to follow tensor i-1 exactly
        for name, offset, nbytes in infos:
            if offset % alignment:
                raise _Bad(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}")
            if offset != expected:
                raise _Bad(f"tensor {name}: data offset {offset}, expected {expected}"
                           " (tensor data must be contiguous, in tensor-info order)")
            end = data_start + offset + nbytes
            if end > self.size:
                raise _Bad(f"truncated: tensor {name} data ends at byte {end} but the file has {self.size} bytes")
            expected = offset + -(-nbytes // alignment) * alignment


def _show(raw: bytes) -> str:
    """A name for messages: quoted, undecodable bytes escaped, at most 64 bytes shown."""
    s = raw[:64].decode("utf-8", "backslashreplace")
    return repr(s) if len(raw) <= 64 else repr(s) + "..."
