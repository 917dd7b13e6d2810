"""Fetch the pinned llama.cpp source into ``vendor/llama.cpp/``.

The pin (``vendor/pin.json``) names a source distribution on the package
registry, its SHA-256 and the subtrees the build needs. The archive is fetched
from the package index with the standard library (``fetch.py``: the user's pip
configuration applies), verified, and only the listed subtrees are extracted,
first into a temporary directory that is renamed into place once complete, so
a failed or refused fetch never leaves a half-extracted tree behind. The pin's
``patches`` (llamabind's own changes, ``vendor/patches/``) are applied to that
temporary tree (``patch.py``). A lock file serialises builds that run at once
in the same tree.

Usage: ``python build_backend/vendor.py [--archive FILE] [--force]``
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    from . import fetch, patch
except ImportError:  # run as a script: python build_backend/vendor.py
    import fetch  # type: ignore[no-redef]
    import patch  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "vendor" / "pin.json"
DEST = ROOT / "vendor" / "llama.cpp"
STAMP = ".llamabind-pin"


class VendorError(RuntimeError):
    """The pinned source could not be fetched, verified or extracted."""


def load_pin(path: Path = PIN_FILE) -> dict:
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(archive: Path, pin: dict) -> None:
    """Raise VendorError unless ``archive`` has the pinned hash."""
    actual = sha256_file(archive)
    if actual != pin["sha256"]:
        raise VendorError(
            f"{archive.name}: sha256 {actual} does not match the pin {pin['sha256']} "
            f"(truncated or tampered download?); refusing to use it"
        )


def cache_dir() -> Path:
    """Where fetched archives are kept: ``sources/`` in llamabind's cache directory (the package's
    own ``_cachedir.py``, loaded by path: the package is not importable while it is being built)."""
    spec = importlib.util.spec_from_file_location("_llamabind_cachedir", ROOT / "src" / "llamabind" / "_cachedir.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cache_dir() / "sources"


def download(pin: dict, into: Path) -> Path:
    """Fetch the pinned sdist from the package index into ``into`` (reused when already there and valid)."""
    target = into / pin["filename"]
    if target.exists():
        try:
            verify(target, pin)
            return target
        except VendorError:
            target.unlink()
    spec = f"{pin['package']}=={pin['version']}"
    try:
        print(f"llamabind build: fetching {spec} from the package index", file=sys.stderr, flush=True)
        fetch.fetch_file(pin["package"], pin["filename"], target)
    except fetch.FetchError as e:
        raise VendorError(f"could not fetch {spec}: {e}") from None
    except OSError as e:
        raise VendorError(f"could not write {spec} into {into}: {e}") from None
    try:
        verify(target, pin)
    except VendorError:
        target.unlink()
        raise
    return target


def _member_wanted(name: str, root: str, subtrees: list[str]) -> str | None:
    """Return the path relative to the llama.cpp root if ``name`` lies in a wanted subtree."""
    if not name.startswith(root + "/"):
        return None
    rel = name[len(root) + 1:]
    for sub in subtrees:
        if rel == sub or rel.startswith(sub + "/"):
            return rel
    return None


def extract(archive: Path, pin: dict, dest: Path = DEST) -> Path:
    """Extract the pinned subtrees of ``archive`` into ``dest`` atomically."""
    verify(archive, pin)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                rel = _member_wanted(member.name, pin["root"], pin["subtrees"])
                if rel is None or not (member.isfile() or member.isdir()):
                    continue
                if ".." in Path(rel).parts:
                    raise VendorError(f"unsafe path in archive: {member.name}")
                out = tmp / rel
                if member.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
                os.chmod(out, 0o755 if member.mode & 0o111 else 0o644)
        missing = [s for s in pin["subtrees"] if not (tmp / s).exists()]
        if missing:
            raise VendorError(f"pinned archive lacks subtrees: {', '.join(missing)}")
        for name, text in _patches(pin):
            try:
                patch.apply(tmp, text)
            except patch.PatchError as e:
                raise VendorError(f"{name}: {e}") from None
        (tmp / STAMP).write_text(_stamp(pin))
        if dest.exists():  # move the stale tree aside first, so dest is never half there
            old = Path(tempfile.mkdtemp(prefix=".llama.cpp-old-", dir=dest.parent))
            dest.rename(old / "tree")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _patches(pin: dict) -> list[tuple[str, str]]:
    """The pin's patches (paths relative to ``vendor/``) as (name, text), in the pin's order."""
    return [(name, (PIN_FILE.parent / name).read_text(encoding="utf-8")) for name in pin.get("patches", [])]


def _stamp(pin: dict) -> str:
    """What the extracted tree records: the archive's hash, the subtrees taken from it and the
    hash of each patch applied (a changed patch makes the tree stale)."""
    applied = [f"{name} {hashlib.sha256(text.encode()).hexdigest()}" for name, text in _patches(pin)]
    return pin["sha256"] + "\n" + "\n".join(sorted(pin["subtrees"]) + applied) + "\n"


def is_current(pin: dict, dest: Path = DEST) -> bool:
    stamp = dest / STAMP
    return stamp.exists() and stamp.read_text() == _stamp(pin)


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``dest`` (two builds at once wait for each other)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: msvcrt locks a byte range instead
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
        else:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def ensure(archive: Path | None = None, force: bool = False, dest: Path = DEST, pin: dict | None = None) -> Path:
    """Make sure ``dest`` holds the pinned source; fetch and extract it when it does not."""
    pin = pin or load_pin()
    if not force and is_current(pin, dest):
        return dest
    with _locked(dest):
        if not force and is_current(pin, dest):  # another build did it while we waited
            return dest
        if archive is None:
            env = os.environ.get("LLAMABIND_LLAMA_SDIST")
            archive = Path(env) if env else download(pin, cache_dir())
        return extract(Path(archive), pin, dest)


def test_material(dest: Path, pin: dict | None = None) -> Path:
    """Extract the pin's ``test_material`` (llama.cpp's own test files, e.g. the vocabularies
    under ``models/``, never part of the build or the sdist) into ``dest``, once."""
    pin = pin or load_pin()
    patterns = pin.get("test_material", [])
    stamp = dest / STAMP
    if stamp.exists() and stamp.read_text() == pin["sha256"] + "\n" + "\n".join(patterns) + "\n":
        return dest
    env = os.environ.get("LLAMABIND_LLAMA_SDIST")
    archive = Path(env) if env else download(pin, cache_dir())
    verify(archive, pin)
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(dest), tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(pin["root"] + "/"):
                continue
            rel = member.name[len(pin["root"]) + 1:]
            if ".." in Path(rel).parts or not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(str(out) + ".part", "wb") as f:
                shutil.copyfileobj(src, f)
            os.replace(str(out) + ".part", out)
        stamp.write_text(pin["sha256"] + "\n" + "\n".join(patterns) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, help="use this local sdist instead of downloading")
    ap.add_argument("--force", action="store_true", help="re-extract even if the tree is current")
    args = ap.parse_args(argv)
    try:
        path = ensure(args.archive, args.force)
    except VendorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
