"""The CUDA flavour: how its NVIDIA libraries are loaded, and the flavour on a real NVIDIA GPU.

The loading tests run on every flavour and machine: ``_preload_cuda`` against fake NVIDIA
libraries (cc builds them), and each import order in its own interpreter, with numpy's OpenBLAS
thread pool as large as on a 16-core GPU machine (the state in which the CUDA wheel crashed,
issue 23). The tests marked ``cuda`` need the CUDA flavour and a CUDA device; elsewhere they skip
with the reason (or fail under LLAMABIND_REQUIRE_ORACLES=1 on the CUDA flavour).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llamabind as lb
from llamabind import _build_info
from conftest import _missing

FLAVOUR_IS_CUDA = _build_info.ACCELERATOR.split("+")[0] == "cuda"
SO_NAMES = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the one running the tests) with ``env`` added."""
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def fake_cuda_site(root: Path, names: tuple[str, ...] = SO_NAMES) -> Path:
    """``root/nvidia/cu13/lib`` with fake libraries of NVIDIA's sonames, each exporting ``<stem>_fake``."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        _missing("no C compiler (cc) to build fake CUDA libraries")
    lib = root / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name in names:
        stem = name.split(".")[0]
        src = root / f"{stem}.c"
        src.write_text(f"int {stem}_fake(void) {{ return 13; }}\n")
        subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(lib / name), str(src)], check=True)
    return root


PRELOAD_PROBE = """
import ctypes, json, sys
from llamabind.raw import _binding
first = {first!r}
if first:
    ctypes.CDLL(first)  # another package (torch, cupy) loaded its own copy earlier
sys.path.insert(0, {site!r})
loaded = _binding._preload_cuda(13)
maps = sorted({{line.split()[-1] for line in open("/proc/self/maps") if "/nvidia/cu13/lib/" in line}})
scope = ctypes.CDLL(None)  # the process's global symbol scope
print(json.dumps({{"loaded": loaded, "maps": maps,
                  "global": [n for n in ("libcudart_fake", "libcublasLt_fake", "libcublas_fake") if hasattr(scope, n)]}}))
"""


def preload(site: Path, first: Path | None = None) -> dict:
    r = run_python(PRELOAD_PROBE.format(site=str(site), first=str(first) if first else ""))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_preload_loads_the_wheels_locally(tmp_path):
    """The runtime wheels' libraries are loaded in dependency order and stay out of the global scope:
    nothing they export can bind a symbol of a library loaded after them."""
    site = fake_cuda_site(tmp_path / "site")
    got = preload(site)
    lib = site / "nvidia" / "cu13" / "lib"
    assert got["global"] == []
    assert got["maps"] == sorted(str(lib / n) for n in SO_NAMES)
    assert got["loaded"] == [str(lib / n) for n in SO_NAMES]


def test_preload_keeps_a_copy_already_loaded(tmp_path):
    """A soname some other package loaded first (torch's libcudart) is used as it is: no second copy
    of the same library from the wheel directory."""
    site = fake_cuda_site(tmp_path / "site")
    other = fake_cuda_site(tmp_path / "torch", ("libcudart.so.13",)) / "nvidia" / "cu13" / "lib" / "libcudart.so.13"
    got = preload(site, first=other)
    lib = site / "nvidia" / "cu13" / "lib"
    assert got["maps"] == sorted([str(other), str(lib / "libcublasLt.so.13"), str(lib / "libcublas.so.13")])
    assert got["loaded"] == [str(lib / "libcublasLt.so.13"), str(lib / "libcublas.so.13")]


def test_a_missing_driver_or_runtime_is_named():
    """The loader's message decides what the ImportError asks for: the driver, or the runtime wheels."""
    from llamabind.raw import _binding

    driver = _binding._cuda_load_error(ImportError("libcuda.so.1: cannot open shared object file"), 13)
    assert "NVIDIA's driver" in str(driver) and "pip install llamabind" in str(driver)
    runtime = _binding._cuda_load_error(ImportError("libcublas.so.13: cannot open shared object file"), 13)
    assert "pip install nvidia-cuda-runtime==13.* nvidia-cublas==13.*" in str(runtime)


IMPORT_PROBE = """
import json
{imports}
import llamabind as lb
print(json.dumps(sorted({{d.backend for d in lb.system.devices()}})))
"""
ORDERS = {
    "numpy-first": "import numpy",
    "llamabind-first": "import llamabind, numpy",
    "torch-first": "import torch",
}


def import_in_subprocess(order: str, **env: str) -> list[str]:
    """Import llamabind after ``ORDERS[order]`` in a fresh interpreter; the device backends it lists."""
    if order == "torch-first":
        try:
            import torch  # noqa: F401
        except ImportError:
            pytest.skip("torch is not installed: the torch-first order cannot be tried")
    r = run_python(IMPORT_PROBE.format(imports=ORDERS[order]), **env)
    assert r.returncode == 0, f"import order {order} exited with {r.returncode}:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", list(ORDERS))
def test_every_import_order_works(order):
    """numpy started first runs its OpenBLAS threads (15 on a 16-core machine) before llamabind's
    libraries load; every order must import and list the CPU device."""
    assert "CPU" in import_in_subprocess(order, OPENBLAS_NUM_THREADS="16")


# -- on an NVIDIA GPU ----------------------------------------------------------------------------


def cuda_devices() -> list:
    return [d for d in lb.system.devices() if d.backend == "CUDA"]


@pytest.fixture()
def need_cuda_device():
    """Skip (visibly) on other flavours; on the CUDA flavour without a device skip, or fail under
    LLAMABIND_REQUIRE_ORACLES=1."""
    if not FLAVOUR_IS_CUDA:
        pytest.skip(f"accelerator {_build_info.ACCELERATOR} has no CUDA backend (build with -C accelerator=cuda)")
    if not cuda_devices():
        _missing("no CUDA device (the CUDA flavour sees none: no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them)")


@pytest.mark.cuda
@pytest.mark.parametrize("order", list(ORDERS))
def test_import_orders_on_the_gpu(need_cuda_device, order):
    assert "CUDA" in import_in_subprocess(order, OPENBLAS_NUM_THREADS="16")


@pytest.mark.cuda
@pytest.mark.parametrize("order", ["numpy-first", "llamabind-first"])
def test_hidden_gpus_fall_back_to_the_cpu(need_cuda_device, order):
    """``CUDA_VISIBLE_DEVICES=`` (empty): the CUDA flavour imports with no CUDA device and runs on the CPU."""
    assert import_in_subprocess(order, CUDA_VISIBLE_DEVICES="") == ["CPU"]


def greedy(model: lb.Model, prompt: str, n: int = 24) -> list[int]:
    with lb.Context(model, n_ctx=512, n_batch=512) as ctx:
        return lb.complete(ctx, prompt, max_tokens=n, ignore_eog=True).tokens


def cpu_only(path: str) -> lb.Model:
    """The same build with no device at all (split_mode none, main_gpu -1: llama.cpp drops every GPU)."""
    return lb.Model(path, split_mode="none", main_gpu=-1)


@pytest.mark.cuda
def test_all_layers_offloaded_and_greedy_equals_cpu(need_cuda_device, tiny_model_path):
    """The f32 tiny model, every layer on the GPU: the same greedy tokens as the CPU backend."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    with cpu_only(tiny_model_path) as cpu:
        want = greedy(cpu, "hello world")
    log, handler = logging.getLogger("llamabind"), Keep(logging.DEBUG)
    old = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        gpu = lb.Model(tiny_model_path, n_gpu_layers=-1)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    text = "\n".join(lines)
    with gpu:
        assert re.search(r"offloaded (\d+)/\1 layers to GPU", text), text[-2000:]
        assert re.search(r"CUDA0 model buffer size", text), text[-2000:]
        assert greedy(gpu, "hello world") == want


@pytest.mark.cuda
def test_embeddings_on_the_gpu_match_the_cpu(need_cuda_device, tiny_model_path):
    texts = ["hello world", "the quick brown fox", "a b c d e f"]
    with cpu_only(tiny_model_path) as cpu, lb.Embedder(cpu, pooling="mean") as emb:
        want = np.asarray(emb.embed(texts))
    with lb.Embedder(tiny_model_path, pooling="mean", n_gpu_layers=-1) as emb:
        got = np.asarray(emb.embed(texts))
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.999, cos


def greedy_within(model: lb.Model, prompt: np.ndarray, out: list[int], tol: float) -> None:
    """Every token of ``out`` is the arg-max, up to ``tol``, of a one-sequence recomputation."""
    seq = np.concatenate([prompt, np.asarray(out[:-1], np.int32)])
    with lb.Context(model, n_ctx=512, n_batch=512) as ref:
        batch = lb.Batch(seq.size)
        batch.add(seq, 0, 0, logits="all")
        ref.decode(batch)
        for k, tok in enumerate(out):
            row = ref.logits(prompt.size - 1 + k)
            assert row[tok] >= row.max() - tol, (k, tok, int(row.argmax()), float(row.max() - row[tok]))


@pytest.mark.cuda
def test_engine_at_64_sequences_on_the_gpu(need_cuda_device, tiny_model_path):
    """64 requests decoded together on the GPU: each gets its 16 tokens, each the greedy choice of a
    one-sequence recomputation up to near-ties (kernels differ by batch size: on the CPU 2 of 64
    requests of this model part from their single-sequence run at a tie within 1e-3)."""
    prompts = [f"request {i}: hello world" for i in range(64)]
    with lb.Model(tiny_model_path, n_gpu_layers=-1) as model:
        with lb.Engine.load(model, n_slots=64, n_ctx=64 * 64) as eng:
            ids = [eng.submit(prompt=p, max_tokens=16, ignore_eog=True) for p in prompts]
            done = {ev.index: ev for ev in eng.run() if isinstance(ev, lb.DoneEvent)}
            assert eng.metrics().mean_batch > 32
        assert sorted(done) == sorted(ids)
        for rid, p in zip(ids, prompts):
            assert len(done[rid].tokens) == 16
            greedy_within(model, model.vocab.tokenize(p), done[rid].tokens, tol=1e-3)

# -- which GPU architectures a CUDA build compiles ------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from build_backend import accelerator  # noqa: E402


@pytest.fixture()
def fake_smi(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` that prints ``out`` and exits with ``rc`` first on PATH."""

    def make(out: str, rc: int = 0) -> None:
        smi = tmp_path / "bin" / "nvidia-smi"
        smi.parent.mkdir(exist_ok=True)
        smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{out}\nEOF\nexit {rc}\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")

    return make


def test_a_build_for_this_machine_compiles_for_its_gpus(fake_smi, tmp_path):
    fake_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\nNVIDIA RTX PRO 6000, 12.0")
    archs, why = accelerator.select_cuda_architectures(None, portable=False, driver_dir=str(tmp_path / "none"))
    assert archs == "90;120" and "NVIDIA H100 80GB HBM3" in why
    assert accelerator.select_cuda_architectures("89", portable=False)[0] == "89"  # a setting wins
    assert accelerator.select_cuda_architectures("86,90", portable=True)[0] == "86;90"
    assert accelerator.select_cuda_architectures(None, portable=True)[0] == accelerator.CUDA_ARCHITECTURES


def test_without_a_named_gpu_native_or_the_wheel_list(fake_smi, tmp_path):
    """nvidia-smi fails (no driver): CMake's native detection where the kernel lists GPUs, else the
    wheel list, saying how to build for one GPU."""
    fake_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", rc=9)
    gpus = tmp_path / "gpus"
    assert accelerator.select_cuda_architectures(None, False, driver_dir=str(gpus))[0] == accelerator.CUDA_ARCHITECTURES
    assert "cuda-architectures=" in accelerator.select_cuda_architectures(None, False, driver_dir=str(gpus))[1]
    (gpus / "0000:01:00.0").mkdir(parents=True)
    assert accelerator.select_cuda_architectures(None, False, driver_dir=str(gpus))[0] == "native"


def test_the_build_estimate_scales_with_architectures_and_cores():
    assert accelerator.build_estimate("90", cores=16) == "1 architecture on 16 cores: roughly 5-11 min"
    assert accelerator.build_estimate("86;89;90", cores=2) == "3 architectures on 2 cores: roughly 120-270 min"


def test_a_cuda_build_prints_what_it_compiles(fake_smi, tmp_path):
    """The backend's own output before anything compiles: architectures, why, and the estimate (the
    build then stops at its compiler check: CC names no compiler)."""
    fake_smi("NVIDIA H100 80GB HBM3, 9.0")
    code = "import os, build_backend as b; b.build_wheel(os.sys.argv[1], {'accelerator': 'cuda'})"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CC": str(tmp_path / "no-cc"), "CMAKE_BUILD_PARALLEL_LEVEL": "16"})
    assert out.returncode != 0
    assert ("llamabind build: CUDA for architectures 90, the GPU present (NVIDIA H100 80GB HBM3); "
            "1 architecture on 16 cores: roughly 5-11 min") in out.stderr, out.stderr[-2000:]
