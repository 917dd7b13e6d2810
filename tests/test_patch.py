"""llamabind's patches to the pinned llama.cpp (``vendor/patches/``): the strict unified-diff
applier, and the vendored tree being exactly the pinned archive with the patches applied."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from build_backend import patch, vendor  # noqa: E402

PATCH = """A comment before the first file is ignored.

--- a/src/a.c
+++ b/src/a.c
@@ -1,3 +1,4 @@
+#include <x.h>
 int a;
 int b;
 int c;
@@ -5,3 +6,3 @@
 int e;
-int f;
+long f;
 int g;
--- a/b.txt
+++ b/b.txt
@@ -1 +1 @@
-old
+new
"""


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_text("int a;\nint b;\nint c;\nint d;\nint e;\nint f;\nint g;\n")
    (tmp_path / "b.txt").write_text("old\n")
    return tmp_path


def test_hunks_apply_where_they_say(tmp_path):
    tree = _tree(tmp_path)
    assert patch.apply(tree, PATCH) == ["src/a.c", "b.txt"]
    assert (tree / "src" / "a.c").read_text() == "#include <x.h>\nint a;\nint b;\nint c;\nint d;\nint e;\nlong f;\nint g;\n"
    assert (tree / "b.txt").read_text() == "new\n"


@pytest.mark.parametrize("damage", [
    lambda t: (t / "src" / "a.c").write_text("int a;\nint b;\nint c;\nint d;\nint e;\nint F;\nint g;\n"),
    lambda t: (t / "src" / "a.c").write_text("int z;\nint a;\nint b;\nint c;\nint d;\nint e;\nint f;\nint g;\n"),
    lambda t: (t / "b.txt").unlink(),
])
def test_a_patch_that_does_not_match_is_refused(tmp_path, damage):
    """No fuzz, no offset search: a different source is an error naming the file."""
    tree = _tree(tmp_path)
    damage(tree)
    with pytest.raises(patch.PatchError, match=r"src/a\.c: the hunk at line \d+ does not match|b\.txt: no such file"):
        patch.apply(tree, PATCH)


@pytest.mark.parametrize("bad", ["no diff here\n", "--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n+b\n",
                                 "--- a/x\n+++ b/x\n@@ -1 +1 @@\n?a\n"])
def test_malformed_patches_are_refused(tmp_path, bad):
    (tmp_path / "x").write_text("a\nb\n")
    with pytest.raises(patch.PatchError):
        patch.apply(tmp_path, bad)
    assert (tmp_path / "x").read_text() == "a\nb\n"


def test_vendored_tree_is_the_archive_with_the_patches(tmp_path):
    """Every file a patch touches differs from the archive exactly by that patch; applying it
    a second time is refused (so the build never double-patches)."""
    pin = vendor.load_pin()
    assert pin["patches"], "the pin names no patch"
    archive = vendor.download(pin, vendor.cache_dir())
    for name, text in vendor._patches(pin):
        files = [rel for rel, _ in patch._files(text)]
        pristine = tmp_path / name
        with tarfile.open(archive, "r:gz") as tar:
            for rel in files:
                member = tar.extractfile(f"{pin['root']}/{rel}")
                assert member is not None
                (pristine / rel).parent.mkdir(parents=True, exist_ok=True)
                (pristine / rel).write_bytes(member.read())
        patch.apply(pristine, text)
        for rel in files:
            assert (pristine / rel).read_bytes() == (vendor.DEST / rel).read_bytes(), f"{name}: {rel}"
        with pytest.raises(patch.PatchError):
            patch.apply(pristine, text)
