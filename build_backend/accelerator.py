"""The one accelerator setting: which ggml backends a build enables, and the wheel's name."""

from __future__ import annotations

from dataclasses import dataclass

# Each accelerator and the ggml CMake option that enables it (cpu enables none).
BACKENDS = {
    "cpu": None,
    "cuda": "GGML_CUDA",
    "vulkan": "GGML_VULKAN",
    "metal": "GGML_METAL",
    "hip": "GGML_HIP",
    "sycl": "GGML_SYCL",
}
ADDONS = {"rpc": "GGML_RPC"}
VALID = ", ".join(list(BACKENDS) + [f"<any>+{a}" for a in ADDONS])


class AcceleratorError(ValueError):
    """An accelerator value that names no known backend."""


@dataclass(frozen=True)
class Accelerator:
    backend: str
    addons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Canonical spelling, e.g. ``cuda`` or ``cuda+rpc``."""
        return "+".join((self.backend, *self.addons))

    @property
    def distribution(self) -> str:
        """Distribution name: ``llamabind`` for cpu, ``llamabind-cuda``, ``llamabind-cuda-rpc``."""
        parts = [p for p in (self.backend, *self.addons) if p != "cpu"]
        return "-".join(["llamabind", *parts])

    def cmake_defines(self) -> dict[str, str]:
        """Every backend option set explicitly, so a platform default (Metal on macOS) never leaks in."""
        defines = {opt: "ON" if name == self.backend else "OFF"
                   for name, opt in BACKENDS.items() if opt}
        defines.update({opt: "ON" if name in self.addons else "OFF" for name, opt in ADDONS.items()})
        defines["LLAMABIND_ACCELERATOR"] = self.name
        return defines


def parse(value: str | None) -> Accelerator:
    """Parse ``cpu``, ``cuda``, ``vulkan+rpc``, ``rpc`` (= ``cpu+rpc``) ...; unknown values raise."""
    text = (value or "cpu").strip().lower().replace(",", "+")
    parts = [p for p in text.split("+") if p]
    backends = [p for p in parts if p in BACKENDS]
    addons = sorted({p for p in parts if p in ADDONS})
    unknown = [p for p in parts if p not in BACKENDS and p not in ADDONS]
    if unknown or len(backends) > 1 or not parts:
        raise AcceleratorError(
            f"unknown accelerator {value!r}; valid values: {VALID} (one backend, rpc may be added)"
        )
    return Accelerator(backends[0] if backends else "cpu", tuple(addons))


def portable_defines() -> dict[str, str]:
    """A CPU build for redistributable wheels: no -march=native, CPU variants chosen at run time."""
    return {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON"}
