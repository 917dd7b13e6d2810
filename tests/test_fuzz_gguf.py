"""Mutation fuzz of the tiny model: a damaged GGUF file must never crash the process.

200 deterministic variants (bit flips in the metadata, truncations, interesting values
written over 4/8-byte fields) are loaded with ``llamabind.Model`` in child processes;
each must load or be refused with a LlamaError.  A signal, an abort or any other Python
exception is a failure, listed variant by variant in the assertion message.

A child loads a batch of variants (starting Python and importing llamabind costs far
more than a load) and announces each before loading it, so a child that dies names the
variant that killed it; that variant is retried alone, and the rest of the batch goes
on in a fresh child.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import gguf
import pytest

N_VARIANTS = 200
N_NATIVE_VARIANTS = 1000  # llama-simple starts in ms: the oracle test affords more
WORKERS = 2
BATCH = 25
TIMEOUT_S = 120
ENV = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort must not wait for gdb to print a backtrace

# argv: the files to load; stdout: "start PATH" before each, then "loaded|refused|error PATH DETAIL"
LOAD_SCRIPT = """
import sys
import llamabind
for path in sys.argv[1:]:
    print("start", path, sep="\t", flush=True)
    try:
        with llamabind.Model(path):
            pass
        outcome, detail = "loaded", ""
    except llamabind.LlamaError as e:
        outcome, detail = "refused", f"{type(e).__name__}: {e}"
    except BaseException as e:
        outcome, detail = "error", f"{type(e).__name__}: {e}"
    print(outcome, path, detail.replace(chr(10), " "), sep="\t", flush=True)
"""

INTERESTING_32 = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 43, 63, 64, 255, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
INTERESTING_64 = [0, 1, 2, 31, 32, 33, 64, 1 << 20, 1 << 31, 1 << 32, 1 << 62, (1 << 63) - 1, 1 << 63,
                  (1 << 64) - 32, (1 << 64) - 1]


Field = tuple[int, int, str]  # offset, size (4 or 8), what it is


def numeric_fields(path: str) -> tuple[list[Field], list[Field], int]:
    """Every 4- or 8-byte number in the file's metadata, split into structure (header,
    key lengths, types, counts, scalar values, tensor infos) and array elements (token
    lengths, scores, token types); and the data start."""
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data  # parts are views into the reader's memmap
    structure: list[Field] = []
    elements: list[Field] = []

    def add(into: list[Field], part, label: str) -> None:
        n = part.dtype.itemsize
        if n in (4, 8) and part.size <= 4:
            start = part.ctypes.data - base
            into += [(start + i * n, n, label if part.size == 1 else f"{label}[{i}]") for i in range(part.size)]

    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            add(structure, f.parts[0], key)
            continue
        is_array = f.types[0] == gguf.GGUFValueType.ARRAY
        is_string = f.types[0] == gguf.GGUFValueType.STRING
        value = "element type" if is_array else ("string length" if is_string else "value")
        for i, label in ((0, "key length"), (2, "value type"), (3, value), (4, "array length")):
            if i < len(f.parts):
                add(structure, f.parts[i], f"{key} {label}")
        if is_array:  # a string element is two parts: length, bytes
            strings = f.types[-1] == gguf.GGUFValueType.STRING
            for j, part in enumerate(f.parts[5:]):
                add(elements, part, f"{key}[{j // 2}] length" if strings else f"{key}[{j}]")
    for t in r.tensors:
        for i, label in ((0, "name length"), (2, "n_dims"), (3, "ne"), (4, "type"), (5, "offset")):
            add(structure, t.field.parts[i], f"tensor {t.name} {label}")
    return structure, elements, int(r.data_offset)


def make_variant(base: bytes, fields: tuple[list[Field], list[Field]],
                 data_start: int, seed: int) -> tuple[str, bytes]:
    """A deterministic mutation of ``base``: (description, bytes)."""
    rng = random.Random(seed)
    data = bytearray(base)
    kind = seed % 4
    if kind == 0:  # flip 1-8 bits in the metadata
        spots = sorted(rng.randrange(data_start) for _ in range(rng.randint(1, 8)))
        for spot in spots:
            data[spot] ^= 1 << rng.randrange(8)
        return f"flip bits at {spots}", bytes(data)
    if kind == 1:  # truncate, mostly inside the metadata
        cut = rng.randrange(data_start) if rng.random() < 0.7 else rng.randrange(len(base))
        return f"truncate at {cut}", bytes(data[:cut])
    # kinds 2, 3: an interesting (or random) value over a 4/8-byte field, mostly a structural one
    offset, size, label = rng.choice(fields[0] if rng.random() < 0.75 else fields[1])
    fmt = "<I" if size == 4 else "<Q"
    old = struct.unpack_from(fmt, data, offset)[0]
    mask = (1 << (8 * size)) - 1
    pool = INTERESTING_32 if size == 4 else INTERESTING_64
    value = rng.choice(pool + [old + 1, old - 1, old * 2, old + 32, rng.getrandbits(8 * size)]) & mask
    struct.pack_into(fmt, data, offset, value)
    return f"{label} (at {offset}): {old} -> {value}", bytes(data)


def write_variants(model: str, out_dir: Path, n: int,
                   keep: Callable[[Path], bool] = lambda path: True) -> dict[str, str]:
    """Write variants 0..n-1 of ``model`` that ``keep`` accepts: {path: description}."""
    base = Path(model).read_bytes()
    *fields, data_start = numeric_fields(model)
    written: dict[str, str] = {}
    for seed in range(n):
        what, data = make_variant(base, tuple(fields), data_start, seed)
        path = out_dir / f"variant-{seed:04d}.gguf"
        path.write_bytes(data)
        if keep(path):
            written[str(path)] = f"variant {seed} ({what})"
        else:
            path.unlink()
    return written


def _how(rc: int | None) -> str:
    if rc is None:
        return f"hung (killed after {TIMEOUT_S} s)"
    return f"killed by signal {-rc}" if rc < 0 else ("aborted" if rc == 134 else f"exit {rc}")


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def load_in_children(paths: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Load each file with llamabind.Model in child processes (see the module docstring):
    {path: (outcome, detail)}, outcome one of loaded, refused, error, crashed."""
    results: dict[str, tuple[str, str]] = {}
    pending = list(paths)
    while pending:
        try:
            p = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, *pending], capture_output=True,
                               text=True, errors="replace", timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, env=ENV)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = _text(e.stdout), _text(e.stderr), None
        started = None
        for line in out.splitlines():
            word, _, rest = line.partition("\t")
            if word == "start":
                started = rest
            elif word in ("loaded", "refused", "error"):
                path, _, detail = rest.partition("\t")
                results[path] = (word, detail)
                started = None
        tail = (err.strip().splitlines() or [""])[-1][:300]
        if started is None:  # finished, or died before loading anything (a broken interpreter or import)
            for path in pending:
                results.setdefault(path, ("error", f"child {_how(rc)} before loading it: {tail}"))
            break
        i = pending.index(started)
        results[started] = ("crashed", f"{_how(rc)}; last stderr line: {tail}")
        if i > 0:  # other files were loaded before it in the same process: does it crash alone?
            alone = load_in_children([started])[started]
            if alone[0] != "crashed":
                results[started] = ("crashed", f"{_how(rc)} after loading {pending[:i]} in the same process"
                                               f" (alone: {alone[0]}); last stderr line: {tail}")
        pending = pending[i + 1:]
    return results


def run_native(paths: Sequence[str], command: Callable[[str], list[str]]) -> dict[str, tuple[str, str]]:
    """Run ``command(path)`` once per file, WORKERS at a time: {path: (exit status, stderr tail)}."""

    def one(path: str) -> tuple[str, str]:
        try:
            p = subprocess.run(command(path), capture_output=True, text=True, errors="replace",
                               timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, env=ENV)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = None, _text(e.stderr)
        return _how(rc), (err.strip().splitlines() or [""])[-1][:300]

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(paths, pool.map(one, paths)))


@pytest.mark.slow
def test_fuzz_model_load_never_crashes(tiny_model_path: str, tmp_path: Path) -> None:
    variants = write_variants(tiny_model_path, tmp_path, N_VARIANTS)
    paths = list(variants)
    batches = [paths[i::WORKERS * 4] for i in range(WORKERS * 4)]  # interleaved: similar mixes
    with ThreadPoolExecutor(WORKERS) as pool:
        results = {k: v for batch in pool.map(load_in_children, batches) for k, v in batch.items()}
    assert sorted(results) == sorted(paths)
    counts = {o: sum(1 for r in results.values() if r[0] == o) for o in ("loaded", "refused", "error", "crashed")}
    failures = [f"{variants[p]}: {outcome}: {detail}; file kept at {p}"
                for p, (outcome, detail) in sorted(results.items()) if outcome in ("error", "crashed")]
    for p, (outcome, _) in results.items():
        if outcome in ("loaded", "refused"):
            os.unlink(p)
    assert not failures, (f"{len(failures)} of {N_VARIANTS} damaged files crashed the process or raised"
                          f" something other than a LlamaError ({counts}):\n" + "\n".join(failures))
    assert counts["refused"] > N_VARIANTS // 2, counts  # most variants really are broken


@pytest.mark.slow
@pytest.mark.oracle
def test_fuzz_accepted_variants_run_natively(tiny_model_path: str, tmp_path: Path,
                                             native_tool: Callable[[str], Path]) -> None:
    """Every variant gguf_check lets through must load and generate in native llama-simple
    (exit 0, or 1 for a clean refusal): gguf_check catches what crashes llama.cpp."""
    from llamabind.errors import ModelLoadError
    from llamabind.gguf_check import check_gguf

    simple = str(native_tool("llama-simple"))

    def accepted(path: Path) -> bool:
        try:
            check_gguf(path)
        except ModelLoadError:
            return False
        return True

    variants = write_variants(tiny_model_path, tmp_path, N_NATIVE_VARIANTS, keep=accepted)
    results = run_native(list(variants), lambda path: [simple, "-m", path, "-n", "4", "hello"])
    failures = [f"{variants[p]}: llama-simple {how}; file kept at {p}; last stderr line: {tail}"
                for p, (how, tail) in sorted(results.items()) if how not in ("exit 0", "exit 1")]
    for p, (how, _) in results.items():
        if how in ("exit 0", "exit 1"):
            os.unlink(p)
    assert not failures, (f"{len(failures)} of {len(variants)} files accepted by check_gguf crash"
                          " llama-simple:\n" + "\n".join(failures))
    assert len(variants) > N_NATIVE_VARIANTS // 20, len(variants)  # the oracle saw enough files
