"""llamabind's in-tree PEP 517 backend: scikit-build-core plus the accelerator setting.

It adds two config settings (or environment variables) on top of scikit-build-core:

* ``accelerator`` / ``LLAMABIND_ACCELERATOR``: ``cpu`` (default), ``cuda``, ``vulkan``,
  ``metal``, ``hip``, ``sycl``, each optionally ``+rpc``. It sets the GGML_* CMake options
  and names the wheel (``llamabind``, ``llamabind-cuda``, ...; all import as ``llamabind``).
* ``portable`` / ``LLAMABIND_PORTABLE``: ``1`` builds a redistributable CPU build
  (no ``-march=native``; the CPU variant is chosen at run time).
* ``cuda-architectures`` / ``LLAMABIND_CUDA_ARCHITECTURES``: the GPU architectures of a CUDA
  build. Default: those of the GPUs present (nvidia-smi; CMake's ``native`` where it cannot
  name them); ``86;89;90`` for a portable build or where the machine has no NVIDIA GPU. The
  build prints what it compiles and a rough duration (``pip install -v`` shows it). A CUDA wheel
  depends on NVIDIA's runtime wheels (``nvidia-cuda-runtime``, ``nvidia-cublas``) of nvcc's major.

Before anything builds, it checks the accelerator value and the C/C++ compilers, and makes
sure the pinned llama.cpp source is in ``vendor/llama.cpp`` (fetching it by hash if not).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from scikit_build_core import build as _skb

from . import accelerator as _acc
from . import vendor as _vendor

BASE_NAME = "llamabind"


def _fail(message: str) -> None:
    print(f"llamabind build: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _setting(config_settings: dict | None, key: str, env: str) -> str | None:
    value = (config_settings or {}).get(key)
    return value if value is not None else os.environ.get(env)


def _prepare(config_settings: dict | None, *, compile: bool, source: bool = True) -> tuple[dict, _acc.Accelerator]:
    """Validate our settings, fetch the source (when ``source``), and translate to scikit-build-core settings."""
    ours = ("accelerator", "portable", "cuda-architectures")
    settings = {k: v for k, v in (config_settings or {}).items() if k not in ours}
    portable = (_setting(config_settings, "portable", "LLAMABIND_PORTABLE") or "").lower() in ("1", "true", "on", "yes")
    try:
        accel = _acc.parse(_setting(config_settings, "accelerator", "LLAMABIND_ACCELERATOR"))
        defines = accel.cmake_defines()
        if accel.backend == "cuda":  # metadata needs only nvcc's CUDA major (for the runtime wheels)
            if compile:
                archs, why = _acc.select_cuda_architectures(
                    _setting(config_settings, "cuda-architectures", "LLAMABIND_CUDA_ARCHITECTURES")
                    or settings.get("cmake.define.CMAKE_CUDA_ARCHITECTURES"), portable)
                print(f"llamabind build: CUDA for architectures {archs}, {why}; {_acc.build_estimate(archs)}",
                      file=sys.stderr, flush=True)
                cuda, major = _acc.cuda_defines(archs)
                defines.update(cuda)
            else:
                major = _acc.cuda_version(_acc.require_nvcc())[0]
            accel = _acc.Accelerator(accel.backend, accel.addons, tuple(_acc.cuda_requires(major)))
        if accel.backend == "vulkan" and compile and (missing := _acc.vulkan_missing()):
            raise _acc.AcceleratorError("accelerator vulkan needs " + "; ".join(missing))
    except _acc.AcceleratorError as e:
        _fail(str(e))
    if portable:
        defines.update(_acc.portable_defines())
    for key, value in defines.items():
        settings.setdefault(f"cmake.define.{key}", value)
    if compile:
        for what, env, names in (("C compiler", "CC", ("cc", "gcc", "clang")),
                                 ("C++ compiler", "CXX", ("c++", "g++", "clang++"))):
            wanted = os.environ.get(env)
            found = shutil.which(wanted.split()[0]) if wanted else any(shutil.which(n) for n in names)
            if not found:
                _fail(f"no {what} found (set {env} or install one, e.g. `apt-get install build-essential`)")
    if source:
        try:
            _vendor.ensure()
        except _vendor.VendorError as e:
            _fail(str(e))
    return settings, accel


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _rename_dist_info(root: Path, old: str, accel: _acc.Accelerator) -> str:
    """Rename ``{old}.dist-info`` under ``root`` for the accelerator; return the new directory name."""
    new = old.replace(_normalise(BASE_NAME), _normalise(accel.distribution), 1)
    (root / old).rename(root / new)
    meta = root / new / "METADATA"
    text = re.sub(r"^Name: .*$", f"Name: {accel.distribution}", meta.read_text(), count=1, flags=re.M)
    if accel.requires:  # after the headers' last line (the body, the README, follows a blank line)
        head, sep, body = text.partition("\n\n")
        text = head + "".join(f"\nRequires-Dist: {r}" for r in accel.requires) + sep + body
    meta.write_text(text)
    return new


def _rename_wheel(directory: str, filename: str, accel: _acc.Accelerator) -> str:
    """Rewrite a built wheel under the accelerator's distribution name (new RECORD included).

    Entries are copied with their zip attributes, so executables (``ggml-rpc-server``) stay executable."""
    if accel.distribution == BASE_NAME:
        return filename
    src = Path(directory) / filename
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        old = next(i.filename.split("/")[0] for i in infos if i.filename.split("/")[0].endswith(".dist-info"))
        meta_root = Path(tmp)
        zf.extract(f"{old}/METADATA", meta_root)
        new = _rename_dist_info(meta_root, old, accel)
        record_rows = []
        out_name = _normalise(accel.distribution) + filename[len(_normalise(BASE_NAME)):]
        with zipfile.ZipFile(Path(directory) / out_name, "w", zipfile.ZIP_DEFLATED) as out:
            for info in infos:
                if info.is_dir() or info.filename == f"{old}/RECORD":
                    continue
                name = info.filename
                data = zf.read(info)
                if name.startswith(old + "/"):
                    name = new + name[len(old):]
                    if name == f"{new}/METADATA":
                        data = (meta_root / new / "METADATA").read_bytes()
                entry = zipfile.ZipInfo(name, date_time=info.date_time)
                entry.external_attr = info.external_attr
                entry.compress_type = zipfile.ZIP_DEFLATED
                out.writestr(entry, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record_rows.append(f"{name},sha256={digest},{len(data)}")
            record_rows.append(f"{new}/RECORD,,")
            out.writestr(zipfile.ZipInfo(f"{new}/RECORD", date_time=infos[-1].date_time),
                         "\n".join(record_rows) + "\n", zipfile.ZIP_DEFLATED)
    src.unlink()
    return out_name


def _backend_requires(config_settings: dict | None) -> list[str]:
    """Build requirements of the accelerator: cuBLAS from NVIDIA's wheel when the CUDA toolkit lacks it."""
    try:
        accel = _acc.parse(_setting(config_settings, "accelerator", "LLAMABIND_ACCELERATOR"))
    except _acc.AcceleratorError as e:
        _fail(str(e))
    return _acc.cuda_build_requires() if accel.backend == "cuda" else []


def get_requires_for_build_wheel(config_settings=None):
    return _skb.get_requires_for_build_wheel(config_settings) + _backend_requires(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _skb.get_requires_for_build_sdist(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _skb.get_requires_for_build_editable(config_settings) + _backend_requires(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    settings, accel = _prepare(config_settings, compile=False, source=False)  # metadata needs no source
    name = _skb.prepare_metadata_for_build_wheel(metadata_directory, settings)
    return name if accel.distribution == BASE_NAME else _rename_dist_info(Path(metadata_directory), name, accel)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    settings, accel = _prepare(config_settings, compile=False, source=False)
    name = _skb.prepare_metadata_for_build_editable(metadata_directory, settings)
    return name if accel.distribution == BASE_NAME else _rename_dist_info(Path(metadata_directory), name, accel)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    settings, accel = _prepare(config_settings, compile=True)
    filename = _skb.build_wheel(wheel_directory, settings, None)
    return _rename_wheel(wheel_directory, filename, accel)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    settings, accel = _prepare(config_settings, compile=True)
    filename = _skb.build_editable(wheel_directory, settings, None)
    return _rename_wheel(wheel_directory, filename, accel)


def build_sdist(sdist_directory, config_settings=None):
    settings, _ = _prepare(config_settings, compile=False)
    return _skb.build_sdist(sdist_directory, settings)
