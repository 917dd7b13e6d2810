"""The build foundation: import, raw surface, build facts, accelerator flag, pinned source."""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import llamabind
from llamabind import ffi, lib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from build_backend import accelerator, vendor  # noqa: E402

LLAMA = ROOT / "vendor" / "llama.cpp"
HEADERS = [LLAMA / "include" / "llama.h", LLAMA / "tools" / "mtmd" / "mtmd.h",
           LLAMA / "tools" / "mtmd" / "mtmd-helper.h", LLAMA / "ggml" / "include" / "ggml-backend.h"]
PKG_DIR = Path(llamabind._llamabind.__file__).resolve().parent


def declared_functions(header: Path) -> set[str]:
    """Function names declared with LLAMA_API / MTMD_API / GGML_API in a header (comments stripped)."""
    text = header.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    names = set()
    for m in re.finditer(r"\b(?:LLAMA_API|MTMD_API|GGML_API)\b([^;{]*?)\(", text):
        decl = m.group(1)
        if "(" in decl:
            continue
        words = re.findall(r"[A-Za-z_]\w*", decl)
        if words:
            names.add(words[-1])
    return names


def linked_libraries() -> list[Path]:
    """The shared libraries the extension links (backend modules of a portable build are
    loaded at run time instead, and export nothing the headers declare)."""
    from llamabind import _build_info

    libs = sorted(PKG_DIR.glob("lib*.so*")) + sorted(PKG_DIR.glob("lib*.dylib"))
    if _build_info.BACKEND_DL:
        libs = [p for p in libs if not re.fullmatch(r"libggml-(?!base)[\w-]+\.(so|dylib)", p.name)]
    return libs


def exported(names: set[str]) -> set[str]:
    """Which names the shared libraries installed with the package export."""
    libs = [ctypes.CDLL(str(p)) for p in linked_libraries()]
    assert libs, f"no shared libraries next to the extension in {PKG_DIR}"
    out = set()
    for n in names:
        for l in libs:
            if hasattr(l, n):
                out.add(n)
                break
    return out


def test_import_needs_no_environment():
    """A bare environment (no LD_LIBRARY_PATH, nothing) imports llamabind and finds its libraries."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    code = "import llamabind; i = llamabind.system_info(); print(i.version, i.llama_cpp_build)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [llamabind.__version__, "11434"]


def test_surface_is_complete():
    """Every function declared in llama.h, mtmd.h, mtmd-helper.h (and ggml-backend.h) that a built
    library exports is reachable as llamabind.lib.<name>."""
    declared = set().union(*(declared_functions(h) for h in HEADERS))
    assert len(declared) > 250 and "llama_decode" in declared and "mtmd_tokenize" in declared
    missing = sorted(n for n in exported(declared) if not hasattr(lib, n))
    assert not missing, f"exported but not bound: {missing}"


LAYOUT_STRUCTS = ("struct llama_context_params", "struct llama_model_params", "llama_batch",
                  "llama_token_data", "llama_token_data_array", "struct llama_sampler_chain_params",
                  "struct llama_sampler_i", "struct mtmd_context_params", "llama_chat_message")


def test_struct_layouts_match_the_compiler(tmp_path):
    """Every field offset and size that cffi uses equals what the C compiler computes from the
    vendored headers (a separate program, compiled here)."""
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "llama.h"', '#include "mtmd.h"',
             "int main(void) {"]
    expect = []
    for st in LAYOUT_STRUCTS:
        lines.append(f'printf("%zu\\n", sizeof({st}));')
        expect.append(ffi.sizeof(st))
        for field, _ in ffi.typeof(st).fields:
            lines.append(f'printf("%zu\\n", offsetof({st}, {field}));')
            expect.append(ffi.offsetof(st, field))
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines + ["return 0; }"]) + "\n")
    exe = tmp_path / "layout"
    cc = subprocess.run(["cc", "-o", str(exe), str(src), f"-I{LLAMA / 'include'}", f"-I{LLAMA / 'ggml' / 'include'}",
                         f"-I{LLAMA / 'tools' / 'mtmd'}"], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr[-2000:]
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == expect
    assert len(expect) > 60
    p = lib.llama_context_default_params()
    assert p.n_ctx == 512 or p.n_ctx > 0
    assert lib.llama_max_devices() >= 1
    m = lib.llama_model_default_params()
    assert m.vocab_only is False and m.progress_callback == ffi.NULL


def test_system_info_reports_build_and_devices():
    info = llamabind.system_info()
    pin = json.loads((ROOT / "vendor" / "pin.json").read_text())
    assert info.llama_cpp_build == pin["build_number"]
    assert info.llama_cpp_sha256 == pin["sha256"]
    assert info.accelerator in ("cpu", "cuda", "vulkan", "metal", "hip", "sycl") or "+" in info.accelerator
    assert "CPU" in info.backends
    assert any(d.type == "cpu" for d in info.devices)
    assert "CPU :" in info.system_info or "CPU" in info.system_info


def test_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "llamabind", "info", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["llama_cpp_build"] == 11434 and data["devices"]


def test_logs_go_to_python_logging_not_stderr(tmp_path):
    """llama.cpp's log lines reach the 'llamabind' logger; nothing is written to the raw stderr."""
    code = (
        "import logging, llamabind as lb\n"
        "records = []\n"
        "h = logging.Handler(); h.emit = records.append\n"
        "logging.getLogger('llamabind').addHandler(h); logging.getLogger('llamabind').setLevel(logging.DEBUG)\n"
        "logging.getLogger('llamabind').propagate = False\n"
        "try:\n"
        "    lb.Model('/nonexistent.gguf')\n"
        "except lb.ModelNotFoundError:\n"
        "    pass\n"
        "lb.lib.llama_print_system_info()\n"
        "import os\n"
        "p = lb.lib.llama_model_default_params(); p.vocab_only = True\n"
        f"m = lb.lib.llama_model_load_from_file(b'{tmp_path}/missing.gguf', p)\n"
        "print(len(records), any('missing.gguf' in r.getMessage() for r in records))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    n, seen = out.stdout.split()
    assert int(n) > 0 and seen == "True"


# -- accelerator flag --------------------------------------------------------------------------

@pytest.mark.parametrize("value, dist, on", [
    (None, "llamabind", []),
    ("cpu", "llamabind", []),
    ("cuda", "llamabind-cuda", ["GGML_CUDA"]),
    ("vulkan", "llamabind-vulkan", ["GGML_VULKAN"]),
    ("metal", "llamabind-metal", ["GGML_METAL"]),
    ("hip", "llamabind-hip", ["GGML_HIP"]),
    ("sycl", "llamabind-sycl", ["GGML_SYCL"]),
    ("rpc", "llamabind-rpc", ["GGML_RPC"]),
    ("cuda+rpc", "llamabind-cuda-rpc", ["GGML_CUDA", "GGML_RPC"]),
    ("RPC,Vulkan", "llamabind-vulkan-rpc", ["GGML_VULKAN", "GGML_RPC"]),
])
def test_accelerator_mapping(value, dist, on):
    acc = accelerator.parse(value)
    assert acc.distribution == dist
    defines = acc.cmake_defines()
    assert sorted(k for k, v in defines.items() if v == "ON") == sorted(on)
    assert defines["GGML_METAL"] in ("ON", "OFF")  # every backend set explicitly, no platform default


@pytest.mark.parametrize("bad", ["opencl", "cuda+vulkan", "gpu", "+", "cuda+foo"])
def test_unknown_accelerator_is_refused(bad):
    with pytest.raises(accelerator.AcceleratorError) as e:
        accelerator.parse(bad)
    for valid in ("cpu", "cuda", "vulkan", "metal", "hip", "sycl", "rpc"):
        assert valid in str(e.value)


def test_backend_refuses_unknown_accelerator_before_compiling(tmp_path):
    """The PEP 517 backend stops at once with the list of valid values (no CMake run)."""
    code = ("import build_backend as b; "
            f"b.build_wheel({str(tmp_path)!r}, {{'accelerator': 'opencl'}})")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "unknown accelerator 'opencl'" in out.stderr and "vulkan" in out.stderr
    assert not list(tmp_path.iterdir())


def test_portable_build_defines():
    d = accelerator.portable_defines()
    assert d == {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON"}


# -- pinned source -----------------------------------------------------------------------------

def _fake_archive(path: Path, root: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_wrong_hash_is_refused_and_leaves_nothing(tmp_path):
    pin = vendor.load_pin()
    archive = tmp_path / pin["filename"]
    _fake_archive(archive, pin["root"], {s: b"x" for s in pin["subtrees"]})
    dest = tmp_path / "out" / "llama.cpp"
    with pytest.raises(vendor.VendorError, match="does not match the pin"):
        vendor.extract(archive, pin, dest)
    assert not dest.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_truncated_archive_is_refused(tmp_path):
    pin = dict(vendor.load_pin())
    full = tmp_path / "full.tar.gz"
    _fake_archive(full, pin["root"], {s: os.urandom(4096) for s in pin["subtrees"]})
    pin["sha256"] = hashlib.sha256(full.read_bytes()).hexdigest()
    cut = tmp_path / pin["filename"]
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(vendor.VendorError, match="does not match the pin"):
        vendor.extract(cut, pin, tmp_path / "llama.cpp")
    assert not (tmp_path / "llama.cpp").exists()


def test_extract_takes_only_pinned_subtrees(tmp_path):
    """With a matching hash, only the listed subtrees are extracted, atomically."""
    pin = dict(vendor.load_pin())
    archive = tmp_path / "src.tar.gz"
    _fake_archive(archive, pin["root"], {"CMakeLists.txt": b"cmake", "src/a.c": b"int a;",
                                         "docs/big.md": b"no", "../evil": b"no"})
    pin.update(sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), subtrees=["CMakeLists.txt", "src"], patches=[])
    dest = vendor.extract(archive, pin, tmp_path / "llama.cpp")
    assert (dest / "src" / "a.c").read_bytes() == b"int a;"
    assert not (dest / "docs").exists()
    assert vendor.is_current(pin, dest)


def test_vendored_tree_matches_pin():
    pin = vendor.load_pin()
    assert vendor.is_current(pin, LLAMA), "vendor/llama.cpp is not the pinned source"
    for sub in pin["subtrees"]:
        assert (LLAMA / sub).exists(), sub


# -- packaging -----------------------------------------------------------------------------

def test_package_ships_type_information():
    assert (PKG_DIR / "py.typed").is_file()
    assert (PKG_DIR / "_build_info.pyi").is_file()


def test_installed_wheel_is_abi3():
    from importlib.metadata import distribution, packages_distributions

    (dist,) = packages_distributions()["llamabind"]  # llamabind, llamabind-rpc, llamabind-cuda, ...
    tags = [l.split(":", 1)[1].strip() for l in distribution(dist).read_text("WHEEL").splitlines()
            if l.startswith("Tag:")]
    assert tags and all("-abi3-" in t and t.startswith("cp310-") for t in tags), tags


def test_libraries_are_single_files_found_by_rpath():
    """One file per shared library (no symlink copies), each finding its siblings via $ORIGIN."""
    libs = sorted(p.name for p in linked_libraries())
    assert {"libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libmtmd.so.0"} <= set(libs), libs
    assert not any(n.endswith(".so") for n in libs)
