"""The one accelerator setting: which ggml backends a build enables, and the wheel's name."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

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
    requires: tuple[str, ...] = ()  # extra Requires-Dist of the wheel (NVIDIA's runtime wheels for cuda)

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


# CUDA: the machine's nvcc, for a list of GPU architectures (a setting); cuBLAS from the toolkit
# or from NVIDIA's wheel in the build environment; the wheel depends on NVIDIA's runtime wheels.
# Wheels meant for other machines (portable=1, scripts/build-wheels.sh) cover the common datacentre
# and desktop GPUs; a build for this machine compiles only for the GPU present (one architecture
# costs ~5 min on 16 cores, ~90 min on 2: nvcc compiles ggml-cuda's kernels once per architecture).
CUDA_ARCHITECTURES = "86;89;90"  # Ampere (RTX 30, A10/A40), Ada (RTX 40, L4/L40), Hopper (H100/H200)
CUDA_CORE_MINUTES_PER_ARCH = (80, 180)  # measured: 265-311 s on 16 cores (H100 host), ~90 min on 2 cores
CUDA_RUNTIME_WHEELS = ("nvidia-cuda-runtime", "nvidia-cublas")


def find_nvcc() -> str | None:
    """``$CUDACXX``, ``nvcc`` on PATH, or the usual toolkit places."""
    import shutil
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise AcceleratorError("accelerator cuda needs nvcc, the CUDA compiler: set CUDACXX or put nvcc on PATH "
                               "(NVIDIA's CUDA toolkit; Debian: nvidia-cuda-toolkit)")
    return nvcc


def cuda_version(nvcc: str) -> tuple[int, int]:
    """The CUDA version nvcc compiles for (``release 13.0`` -> (13, 0))."""
    import subprocess
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise AcceleratorError(f"{nvcc} --version names no CUDA release")
    return int(match.group(1)), int(match.group(2))


def _toolkit_lib_dirs(nvcc: str) -> list[Path]:
    root = Path(os.path.realpath(nvcc)).parent.parent
    if (root / "bin" / "nvcc").is_file() and not (root / "lib64").exists():  # a wrapper script
        root = Path("/usr/local/cuda")
    return [root / "lib64", root / "targets" / "x86_64-linux" / "lib", root / "lib"]


def _has(dirs: list[Path], pattern: str) -> bool:
    return any(next(d.glob(pattern), None) is not None for d in dirs if d.is_dir())


def wheel_lib_dir(pattern: str, major: int, paths: list[str] | None = None) -> Path | None:
    """The ``lib`` directory of an NVIDIA wheel holding ``pattern``: ``nvidia/cu13/lib`` (CUDA 13
    wheels share one tree) or ``nvidia/<component>/lib`` (CUDA 12 and older)."""
    for entry in sys.path if paths is None else paths:
        root = Path(entry) / "nvidia"
        for lib in [root / f"cu{major}" / "lib", *sorted(root.glob("*/lib"))]:
            if _has([lib], pattern):
                return lib
    return None


def gpus_present(smi: str = "nvidia-smi") -> list[tuple[str, str]] | None:
    """(name, architecture) of each NVIDIA GPU nvidia-smi lists (``9.0`` -> ``90``); None where
    nvidia-smi is missing or cannot reach a driver."""
    import shutil
    import subprocess
    exe = shutil.which(smi)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [(m.group(1).strip(), m.group(2) + m.group(3)) for line in out.stdout.splitlines()
            if (m := re.match(r"^(.*),\s*(\d+)\.(\d+)\s*$", line))]
    return gpus if out.returncode == 0 and gpus else None


def select_cuda_architectures(setting: str | None, portable: bool,
                              driver_dir: str = "/proc/driver/nvidia/gpus") -> tuple[str, str]:
    """The CMAKE_CUDA_ARCHITECTURES of a build and why: the setting when given; the wheel list for a
    portable build; else the GPUs present (nvidia-smi), CMake's ``native`` where a driver lists GPUs
    that nvidia-smi could not name, and the wheel list only where this machine has no NVIDIA GPU."""
    if setting:
        return setting.replace(",", ";"), "as set by cuda-architectures"
    if portable:
        return CUDA_ARCHITECTURES, "the wheel list (portable=1: a build for other machines)"
    gpus = gpus_present()
    if gpus:
        archs = sorted({a for _, a in gpus}, key=int)
        names = ", ".join(sorted({n for n, _ in gpus}))
        return ";".join(archs), f"the GPU present ({names})"
    if os.path.isdir(driver_dir) and os.listdir(driver_dir):
        return "native", "the GPU present (nvidia-smi could not name it: CMake's native detection)"
    return CUDA_ARCHITECTURES, ("the wheel list: no NVIDIA GPU here (set -C cuda-architectures=<one, e.g. 90> "
                                "to build only for the GPU that will run it)")


def build_estimate(architectures: str, cores: int | None = None) -> str:
    """A rough duration of the CUDA build: ggml-cuda's kernels are compiled once per architecture."""
    cores = cores or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or 0) or os.cpu_count() or 1
    n = max(1, len([a for a in architectures.split(";") if a])) if architectures != "native" else 1
    lo, hi = (round(m * n / cores) for m in CUDA_CORE_MINUTES_PER_ARCH)
    return f"{n} architecture{'s' * (n > 1)} on {cores} cores: roughly {max(lo, 1)}-{max(hi, 1)} min"


def cuda_defines(architectures: str) -> tuple[dict[str, str], int]:
    """CMake defines for a CUDA build for ``architectures`` and the CUDA major; AcceleratorError
    names what is missing."""
    nvcc = require_nvcc()
    major = cuda_version(nvcc)[0]
    defines = {"CMAKE_CUDA_COMPILER": nvcc, "CMAKE_CUDA_ARCHITECTURES": architectures}
    lib_dirs = _toolkit_lib_dirs(nvcc)
    if not _has(lib_dirs, "libcublas.so*"):
        lib = wheel_lib_dir("libcublas.so*", major)
        if lib is None:
            raise AcceleratorError(f"accelerator cuda needs cuBLAS: the toolkit of {nvcc} has no libcublas and "
                                   f"no nvidia-cublas=={major}.* wheel is in the build environment")
        defines["CUDA_cublas_LIBRARY"] = str(next(lib.glob("libcublas.so*")))
        defines["CUDA_cublasLt_LIBRARY"] = str(next(lib.glob("libcublasLt.so*")))
        defines["CMAKE_CUDA_FLAGS"] = f"-I{lib.parent / 'include'}"
    if not _has([d / "stubs" for d in lib_dirs], "libcuda.so*"):
        defines["GGML_CUDA_NO_VMM"] = "ON"  # no driver stub to link against: cudart loads the driver itself
    return defines, major


def cuda_build_requires(nvcc: str | None = None) -> list[str]:
    """NVIDIA wheels the build environment needs: cuBLAS headers and library when the toolkit lacks them."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return []
    if _has(_toolkit_lib_dirs(nvcc), "libcublas.so*"):
        return []
    major, minor = cuda_version(nvcc)
    return [f"nvidia-cublas=={major}.{minor}.*"]  # headers of the compiler's own release


def cuda_requires(major: int) -> list[str]:
    """The runtime wheels a CUDA wheel depends on (found and preloaded by llamabind.raw at import)."""
    return [f"{name}=={major}.*" for name in CUDA_RUNTIME_WHEELS]


# Vulkan: headers (vulkan.hpp with VK_EXT_layer_settings), the glslc shader compiler, SPIR-V headers.
def vulkan_missing() -> list[str]:
    """What a Vulkan build lacks here, each with the Debian package that provides it."""
    import shutil
    missing = []
    if not (os.environ.get("GLSLC") or shutil.which("glslc")):
        missing.append("glslc, the GLSL to SPIR-V compiler (Debian: glslc)")
    sdk = os.environ.get("VULKAN_SDK")  # LunarG's convention, honoured by CMake's FindVulkan
    include = [Path(p) for p in ((f"{sdk}/include",) if sdk else ()) + ("/usr/include", "/usr/local/include")]
    hpp = next((d / "vulkan" / "vulkan.hpp" for d in include if (d / "vulkan" / "vulkan.hpp").is_file()), None)
    if hpp is None:
        missing.append("the Vulkan headers (Debian: libvulkan-dev)")
    elif "LayerSettingEXT" not in (hpp.parent / "vulkan_structs.hpp").read_text(errors="replace"):
        missing.append(f"Vulkan headers new enough for ggml-vulkan ({hpp.parent} lacks vk::LayerSettingEXT; "
                       "Debian 12's libvulkan-dev 1.3.239 is too old): install libvulkan-dev >= 1.3.261 (Debian "
                       "trixie) or set VULKAN_SDK to a directory whose include/ holds newer headers "
                       "(scripts/vulkan-lavapipe.sh extracts trixie's)")
    if not any((d / "spirv" / "unified1" / "spirv.hpp").is_file() for d in include):
        missing.append("the SPIR-V headers (Debian: spirv-headers)")
    return missing
