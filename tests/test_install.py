"""The sdist as users get it: it ships the pinned llama.cpp, and installs with build isolation
and no network at all (no fetch), then generates the same tokens as this installation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """``python -m build --sdist`` of this tree, built once."""
    pytest.importorskip("build")
    out_dir = tmp_path_factory.mktemp("sdist")
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out_dir), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (path,) = out_dir.glob("llamabind-*.tar.gz")
    return path


def test_sdist_contains_the_pinned_source(sdist):
    """The sdist ships vendor/llama.cpp with its stamp, so it builds offline."""
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    root = sdist.name[: -len(".tar.gz")]
    for must in ("vendor/pin.json", "vendor/llama.cpp/CMakeLists.txt", "vendor/llama.cpp/.llamabind-pin",
                 "vendor/llama.cpp/include/llama.h", "vendor/llama.cpp/tools/mtmd/mtmd.h",
                 "build_backend/__init__.py", "build_backend/fetch.py", "CMakeLists.txt"):
        assert f"{root}/{must}" in names, must
    assert not any("/build/" in n or n.endswith(".lock") for n in names)


def _no_network_prefix() -> list[str]:
    """``unshare -n`` (a network namespace with no interfaces up) where this user may make one."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.mark.slow
def test_sdist_installs_with_isolation_and_no_network(sdist, tmp_path, tiny_model_path):
    """pip install of the sdist: build requirements from a local wheelhouse, an empty llamabind
    cache, no package index, and (where possible) no network interface at all."""
    wheelhouse = tmp_path / "wheelhouse"
    reqs = ["scikit-build-core>=0.10", "cffi>=1.17", "cmake>=3.26", "ninja", "numpy>=1.24"]
    out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:",
                          "-d", str(wheelhouse), *reqs], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    empty = tmp_path / "empty-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "LLAMABIND_"))}
    env.update(XDG_CACHE_HOME=str(empty), LLAMABIND_CACHE=str(empty / "llamabind"), PIP_CONFIG_FILE=os.devnull,
               CCACHE_DIR=os.environ.get("CCACHE_DIR", str(Path.home() / ".cache" / "ccache")),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [*_no_network_prefix(), str(py), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
           str(sdist)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fetching" not in out.stdout + out.stderr
    assert not (empty / "llamabind" / "sources").exists()
    code = ("import sys, llamabind as lb; m = lb.Model(sys.argv[1]); c = lb.Context(m, n_ctx=64, n_threads=1); "
            "print(lb.complete(c, 'hello', max_tokens=8, ignore_eog=True).tokens)")
    got = subprocess.run([str(py), "-c", code, tiny_model_path], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    import llamabind as lb

    with lb.Model(tiny_model_path) as m, lb.Context(m, n_ctx=64, n_threads=1) as c:
        want = lb.complete(c, "hello", max_tokens=8, ignore_eog=True).tokens
    assert got.stdout.strip() == str(want)
