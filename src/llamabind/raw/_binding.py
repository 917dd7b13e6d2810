"""The raw C surface: ``ffi`` and ``lib`` over llama.h, mtmd.h and mtmd-helper.h.

Everything exported by libllama, ggml and libmtmd is reachable as ``lib.<name>``; structs
and enums are known to ``ffi``. Nothing here is safe: the objects in the other modules are.
Importing this module routes llama.cpp's, ggml's and libmtmd's log output to the Python
logger ``llamabind`` and initialises the ggml backends once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

from .. import _build_info

# Every flavour installs the package ``llamabind``; the distributions are named after the accelerator.
_FLAVOUR_DIST = re.compile(r"^(llamabind(?:_(?:cpu|cuda|vulkan|metal|hip|sycl|rpc))*)-[^-]+\.dist-info$")
_CUDA_LIBS = ("libcudart.so.{}", "libcublasLt.so.{}", "libcublas.so.{}")


def _flavours(site: str) -> dict[str, str]:
    """The llamabind distributions installed in ``site``: name -> dist-info directory."""
    try:
        names = os.listdir(site)
    except OSError:
        return {}
    return {m.group(1).replace("_", "-"): os.path.join(site, n) for n in names if (m := _FLAVOUR_DIST.match(n))}


def _check_one_flavour(site: str) -> dict[str, str]:
    """Two flavours in one environment overwrite each other's files: refuse to run on the mixture."""
    found = _flavours(site)
    if len(found) > 1:
        names = " ".join(sorted(found))
        raise ImportError(f"several llamabind flavours are installed in {site}: {', '.join(sorted(found))}. They "
                          f"all install the package 'llamabind' and overwrite each other's files (the files "
                          f"found now are from the {_build_info.ACCELERATOR} build). Keep one: "
                          f"pip uninstall -y {names}, then install the one you want.")
    return found


def _cuda_major(dist_info: str | None) -> int | None:
    """The CUDA major the wheel was built for, from its Requires-Dist on nvidia-cuda-runtime."""
    try:
        with open(os.path.join(dist_info or "", "METADATA"), encoding="utf-8") as f:
            match = re.search(r"^Requires-Dist: nvidia-cuda-runtime==(\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _preload_cuda(major: int) -> list[str]:
    """Load libcudart/libcublasLt/libcublas of NVIDIA's runtime wheels (``nvidia/cu13/lib``, or
    ``nvidia/<component>/lib`` for CUDA 12) before the extension, so that its ``NEEDED`` entries
    match them by soname; return the files loaded.

    They are loaded ``RTLD_LOCAL``: nothing enters the process's global symbol scope, where it
    could bind symbols of libraries loaded later. A soname already loaded (by torch, cupy, or
    the system's CUDA) is kept, never loaded a second time from another file. Where no wheel is
    found, the dynamic linker finds the system's CUDA itself."""
    import ctypes

    loaded = []
    for soname in (name.format(major) for name in _CUDA_LIBS):
        try:
            ctypes.CDLL(soname, mode=os.RTLD_NOW | os.RTLD_NOLOAD)
            continue  # already in the process: the extension binds to that copy
        except OSError:
            pass
        for entry in sys.path:
            root = os.path.join(entry, "nvidia")
            dirs = [os.path.join(root, f"cu{major}", "lib")] + [
                os.path.join(root, d, "lib") for d in ("cuda_runtime", "cublas")]
            path = next((os.path.join(d, soname) for d in dirs if os.path.isfile(os.path.join(d, soname))), None)
            if path is not None:
                ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
                loaded.append(path)
                break
    return loaded


def _load_extension():
    """Import the compiled extension; a missing CUDA runtime is named with the wheels that provide it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = _check_one_flavour(os.path.dirname(here))
    cuda = _build_info.ACCELERATOR.split("+")[0] == "cuda"
    major = _cuda_major(next(iter(found.values()), None)) if cuda else None
    if major is not None:
        _preload_cuda(major)
    try:
        from .. import _llamabind as extension
    except ImportError as e:
        if not cuda or not re.search(r"lib(cudart|cublas|cublasLt|cuda)\.so", str(e)):
            raise
        raise _cuda_load_error(e, major) from e
    return extension


def _cuda_load_error(e: ImportError, major: int | None) -> ImportError:
    """What a CUDA build lacks, from the loader's message: NVIDIA's driver, or its CUDA runtime."""
    if re.search(r"libcuda\.so", str(e)):
        return ImportError(f"llamabind-cuda cannot load NVIDIA's driver ({e}): this build links libcuda.so.1 "
                           f"(its toolkit had the driver stubs). Install NVIDIA's driver, or on a machine "
                           f"without an NVIDIA GPU use the CPU flavour (pip install llamabind).")
    want = f"=={major}.*" if major else ""
    return ImportError(f"llamabind-cuda cannot load CUDA ({e}). Install NVIDIA's runtime wheels "
                       f"(pip install nvidia-cuda-runtime{want} nvidia-cublas{want}) or the CUDA "
                       f"{major or ''} toolkit system-wide; running on a GPU also needs NVIDIA's driver "
                       f"(libcuda.so.1).")


_llamabind = _load_extension()
ffi, lib = _llamabind.ffi, _llamabind.lib

__all__ = ["ffi", "lib", "logger"]

logger = logging.getLogger("llamabind")
# A library prints nothing until the application configures logging (no last-resort output).
logger.addHandler(logging.NullHandler())

# ggml_log_level -> logging level; GGML_LOG_LEVEL_CONT continues the previous message.
_LEVELS = {
    lib.GGML_LOG_LEVEL_NONE: logging.INFO,
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


class _LogState(threading.local):
    """Per-thread partial line, so pieces of one message from one thread stay together."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.buffer = ""
        self.errors: list[str] = []


_log_state = _LogState()


@ffi.def_extern()
def _llamabind_log(level: int, text, user_data) -> None:
    state = _log_state
    if level != lib.GGML_LOG_LEVEL_CONT:
        state.level = _LEVELS.get(level, logging.INFO)
    state.buffer += ffi.string(text).decode("utf-8", "replace")
    if "\n" not in state.buffer:
        return
    *lines, state.buffer = state.buffer.split("\n")
    if state.level >= logging.ERROR:
        state.errors.extend(line.strip() for line in lines if line.strip())
        del state.errors[:-8]
    if logger.isEnabledFor(state.level):
        for line in lines:
            if line.strip():
                logger.log(state.level, "%s", line)


def take_errors() -> str:
    """The error lines llama.cpp logged on this thread since the last call, joined ("" if none)."""
    errors, _log_state.errors = _log_state.errors, []
    return "; ".join(errors)


def _init() -> None:
    lib.llama_log_set(lib._llamabind_log, ffi.NULL)
    lib.mtmd_helper_log_set(lib._llamabind_log, ffi.NULL)
    if _build_info.BACKEND_DL:
        # Backends are separate modules next to this file; ggml picks the best CPU variant.
        here = os.path.dirname(os.path.abspath(_llamabind.__file__))
        lib.ggml_backend_load_all_from_path(here.encode())
        if _build_info.ACCELERATOR.split("+")[0] == "cuda" and lib.ggml_backend_reg_by_name(b"CUDA") == ffi.NULL:
            _cuda_module_failed(os.path.join(here, "libggml-cuda.so"))
    lib.llama_backend_init()


def _cuda_module_failed(module: str) -> None:
    """A CUDA build whose backend module did not load: say why (the loader's message) and what to install."""
    import ctypes

    try:
        ctypes.CDLL(module)
        why = "it loads, but registered no backend"
    except OSError as e:
        why = str(e)
    raise ImportError(f"llamabind-cuda cannot load its CUDA backend ({why}). Install NVIDIA's runtime wheels "
                      f"(pip install nvidia-cuda-runtime nvidia-cublas, of the CUDA major it was built for) or "
                      f"CUDA system-wide; running on a GPU also needs NVIDIA's driver (libcuda.so.1).")


_init()
