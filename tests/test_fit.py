"""``n_gpu_layers="auto"`` / ``n_ctx="auto"`` through llama.cpp's common_fit_params: a no-op without a
GPU device, the shim itself on the host, and (marked ``cuda``) the fit on an NVIDIA GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

import llamabind as lb
from llamabind import _build_info

HAS_GPU = any(d.type in ("gpu", "igpu") for d in lb.system.devices())


def greedy(model: lb.Model, n_ctx: int | str = 512) -> list[int]:
    with lb.Context(model, n_ctx=n_ctx, n_batch=512) as ctx:
        return lb.complete(ctx, "hello world", max_tokens=16, ignore_eog=True).tokens


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU device: the fit is not a no-op here")
def test_auto_is_a_no_op_without_a_gpu(tiny_model_path):
    """No GPU device: "auto" loads the model as the defaults do (on the CPU), the context is the
    model's training context, and the report says so."""
    with lb.Model(tiny_model_path) as plain:
        want = greedy(plain)
        assert plain.fit is None
    with lb.Model(tiny_model_path, n_gpu_layers="auto") as model:
        assert model.fit.status == "no device" and model.fit.n_gpu_layers == 0 and "CPU" in model.fit.reason
        assert greedy(model) == want
        with lb.Context(model, n_ctx="auto") as ctx:
            assert ctx.n_ctx == model.n_ctx_train == 2048
    with lb.Model(tiny_model_path) as plain, lb.Context(plain, n_ctx="auto") as ctx:
        assert ctx.n_ctx == 2048


def test_auto_is_the_only_word(tiny_model_path):
    with pytest.raises(lb.InvalidInputError, match="'auto'"):
        lb.Model(tiny_model_path, n_gpu_layers="all")


FIT_ON_THE_HOST = """
from llamabind import fit
from llamabind.raw import ffi, lib
mparams = lib.llama_model_default_params()
mparams.n_gpu_layers = fit.layers("auto")
cparams = lib.llama_context_default_params()
cparams.n_ctx = 0
split = ffi.new("float[]", lib.llama_max_devices())
tbo = ffi.new("struct llama_model_tensor_buft_override[]", lib.llama_max_tensor_buft_overrides())
out = ffi.new("struct llamabind_fit_device[]", 4)
n = ffi.new("int32_t *")
rc = lib.llamabind_fit_params({path!r}.encode(), ffi.addressof(mparams), ffi.addressof(cparams), 1 << 30, 4096,
                              split, tbo, out, 4, n)
import json, sys
json.dump({{"rc": rc, "n_ctx": cparams.n_ctx, "n": n[0], "name": ffi.string(out[n[0] - 1].name).decode(),
           "model": out[n[0] - 1].model, "total": out[n[0] - 1].total}}, open({result!r}, "w"))
"""


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU device: the host-only fit path is not taken")
def test_the_shim_fits_on_the_host_and_prints_nothing(tiny_model_path, tmp_path):
    """llamabind_fit_params with no GPU device: llama.cpp's fit checks system memory, resolves the
    context to the training context, measures the model on the host, and prints nothing (common's
    log is silenced; llama.cpp's goes to the llamabind logger, which has no handler here)."""
    import json

    result = tmp_path / "fit.json"
    r = subprocess.run([sys.executable, "-c", FIT_ON_THE_HOST.format(path=tiny_model_path, result=str(result))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "" and r.stderr == ""
    got = json.loads(result.read_text())
    assert got["rc"] == 0 and got["n_ctx"] == 2048
    assert got["n"] == 1 and got["name"] == "host" and 0 < got["model"] < 1 << 20 and got["total"] > 1 << 30


@pytest.mark.cuda
def test_auto_offloads_the_tiny_model_on_the_gpu(tiny_model_path):
    if _build_info.ACCELERATOR.split("+")[0] != "cuda" or not HAS_GPU:
        pytest.skip(f"needs the CUDA flavour and a GPU device (accelerator {_build_info.ACCELERATOR})")
    with lb.Model(tiny_model_path, split_mode="none", main_gpu=-1) as cpu:
        want = greedy(cpu)
    with lb.Model(tiny_model_path, n_gpu_layers="auto") as model:
        report = model.fit
        print(report)
        assert report.status == "fits" and report.n_gpu_layers == -1  # everything fits: left at "all"
        assert report.n_ctx == 2048 and report.devices[0].name == "CUDA0" and report.devices[0].model_mib > 0
        assert greedy(model, "auto") == want
