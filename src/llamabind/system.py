"""What this build is and what it finds at run time: version, llama.cpp build, backends, devices."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import _build_info
from .raw import ffi, lib

__version__ = "0.1.0"

_DEVICE_TYPES = {
    lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    lib.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


@dataclass(frozen=True)
class Device:
    """One ggml backend device found at run time."""

    name: str
    description: str
    type: str
    backend: str
    memory_free: int
    memory_total: int


@dataclass(frozen=True)
class SystemInfo:
    """Everything ``python -m llamabind info`` reports."""

    version: str
    llama_cpp_build: int
    llama_cpp_source: str
    llama_cpp_sha256: str
    accelerator: str
    native: bool
    backend_dl: bool
    compiler: str
    backends: list[str] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    system_info: str = ""
    supports_gpu_offload: bool = False
    supports_mmap: bool = False
    supports_mlock: bool = False
    supports_rpc: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _str(ptr) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def devices() -> list[Device]:
    """The ggml devices registered now (CPU, GPUs, ...), with free and total memory."""
    out = []
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        out.append(Device(
            name=_str(lib.ggml_backend_dev_name(dev)),
            description=_str(lib.ggml_backend_dev_description(dev)),
            type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
            backend=_str(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev))),
            memory_free=int(free[0]),
            memory_total=int(total[0]),
        ))
    return out


def system_info() -> SystemInfo:
    """Report the llamabind version, the llama.cpp build, the accelerator and the devices found."""
    return SystemInfo(
        version=__version__,
        llama_cpp_build=_build_info.LLAMA_CPP_BUILD,
        llama_cpp_source=_build_info.LLAMA_CPP_SOURCE,
        llama_cpp_sha256=_build_info.LLAMA_CPP_SHA256,
        accelerator=_build_info.ACCELERATOR,
        native=_build_info.NATIVE,
        backend_dl=_build_info.BACKEND_DL,
        compiler=_build_info.COMPILER,
        backends=[_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)))
                  for i in range(lib.ggml_backend_reg_count())],
        devices=devices(),
        system_info=_str(lib.llama_print_system_info()).strip(),
        supports_gpu_offload=bool(lib.llama_supports_gpu_offload()),
        supports_mmap=bool(lib.llama_supports_mmap()),
        supports_mlock=bool(lib.llama_supports_mlock()),
        supports_rpc=bool(lib.llama_supports_rpc()),
    )
