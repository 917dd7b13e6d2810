"""``n_gpu_layers="auto"`` and ``n_ctx="auto"``: the layers offloaded and the context size fitted
to the free memory of the devices by llama.cpp's own fit (common/fit.h; llama-server does this by
default), with a report of what was chosen and why.

``Model(path, n_gpu_layers="auto")`` fits the layers and the context together (one sequence, the
context's default types) before loading, and keeps the report as ``model.fit``;
``Context(model, n_ctx="auto")`` takes the context size from it. Where no GPU device exists the
fit does nothing: the model stays on the CPU (``n_gpu_layers=0``) and the context is the model's
training context (``n_ctx=0``), exactly as without "auto".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidInputError
from .raw import ffi, lib
from .system import devices

AUTO = "auto"
Auto = Literal["auto"]
MARGIN_MIB = 1024  # memory left free on each device: llama-server's default --fit-target
N_CTX_MIN = 4096  # the smallest context the fit shrinks to: llama-server's default --fit-ctx
_MIB = 1024 * 1024
_STATUS = {0: "fits", 1: "does not fit", 2: "error", -1: "error"}


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory in MiB: free and total before loading, and the projected use."""

    name: str
    description: str
    free_mib: float
    total_mib: float
    model_mib: float
    context_mib: float
    compute_mib: float


@dataclass
class FitReport:
    """What the fit chose (``n_gpu_layers``, ``n_ctx``: 0 is the model's training context) and why."""

    status: str  # "fits", "does not fit", "error" or "no device"
    n_gpu_layers: int
    n_ctx: int
    reason: str
    devices: list[DeviceMemory] = field(default_factory=list)
    _buffers: tuple[Any, ...] = field(default=(), repr=False)  # what the fitted llama_model_params points at

    def __str__(self) -> str:
        lines = [f"fit: {self.status}: n_gpu_layers={self.n_gpu_layers}, n_ctx={self.n_ctx} ({self.reason})"]
        lines += [f"  {d.name} ({d.description}): {d.model_mib:.0f} MiB model + {d.context_mib:.0f} context + "
                  f"{d.compute_mib:.0f} compute of {d.free_mib:.0f} free / {d.total_mib:.0f} total"
                  for d in self.devices]
        return "\n".join(lines)


def layers(n_gpu_layers: int | Auto) -> int:
    """The n_gpu_layers to set before the fit: llama.cpp's default for "auto" (the fit changes only that)."""
    if n_gpu_layers == AUTO:
        return int(lib.llama_model_default_params().n_gpu_layers)
    if isinstance(n_gpu_layers, str):
        raise InvalidInputError(f"n_gpu_layers must be an int or 'auto', not {n_gpu_layers!r}")
    return n_gpu_layers


def _has_gpu(mparams) -> bool:
    return mparams.devices != ffi.NULL or any(d.type in ("gpu", "igpu") for d in devices())


def fit_model(path: str, mparams, margin_mib: int = MARGIN_MIB, n_ctx_min: int = N_CTX_MIN) -> FitReport:
    """Fit ``mparams`` (its n_gpu_layers set by ``layers("auto")``) in place, with the context
    (n_ctx "auto", otherwise llama's defaults); a no-op without a GPU device."""
    if not _has_gpu(mparams):
        mparams.n_gpu_layers = 0
        return FitReport("no device", 0, 0, "no GPU device: the model stays on the CPU, the context is the "
                                             "model's training context")
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = 0
    split = ffi.new("float[]", int(lib.llama_max_devices()))
    overrides = ffi.new("struct llama_model_tensor_buft_override[]", int(lib.llama_max_tensor_buft_overrides()))
    out = ffi.new("struct llamabind_fit_device[]", int(lib.llama_max_devices()) + 1)
    n = ffi.new("int32_t *")
    progress, mparams.progress_callback = mparams.progress_callback, ffi.NULL  # the fit's trial loads report none
    try:
        rc = lib.llamabind_fit_params(path.encode(), ffi.addressof(mparams), ffi.addressof(cparams),
                                      margin_mib * _MIB, n_ctx_min, split, overrides, out, len(out), n)
    finally:
        mparams.progress_callback = progress
    found = [DeviceMemory(ffi.string(d.name).decode(), ffi.string(d.description).decode(), d.free / _MIB,
                          d.total / _MIB, d.model / _MIB, d.context / _MIB, d.compute / _MIB) for d in out[0:n[0]]]
    status = _STATUS.get(rc, "error")
    reason = {"fits": f"projected to leave at least {margin_mib} MiB free on each device",
              "does not fit": f"no offload leaves {margin_mib} MiB free on each device with a context of at least "
                              f"{n_ctx_min}: these are as far as the fit got",
              "error": "llama.cpp's fit failed (see the llamabind logger's debug lines)"}[status]
    return FitReport(status, int(mparams.n_gpu_layers), int(cparams.n_ctx), reason, found, (split, overrides))


def context_size(model: Any) -> int:
    """The n_ctx for ``Context(model, n_ctx="auto")``: the model's fitted context; 0 (its training
    context) on a machine without a GPU device."""
    report = getattr(model, "fit", None)
    if report is not None:
        return report.n_ctx
    if not any(d.type in ("gpu", "igpu") for d in devices()):
        return 0
    raise InvalidInputError("n_ctx='auto' is fitted together with the layers: load the model with "
                            "n_gpu_layers='auto'")
