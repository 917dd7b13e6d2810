"""Apply a unified diff to a source tree, strictly: every hunk must match exactly where it says.

The pinned llama.cpp carries a few changes of llamabind's own (``vendor/patches/``). They are
applied here, in the standard library, so that a build needs neither ``patch`` nor ``git``; a
hunk that does not match (a new pin) is an error naming the file and hunk, never a fuzzy guess.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ValueError):
    """A patch that is malformed or does not apply to the tree."""


def _files(text: str) -> list[tuple[str, list[tuple[int, list[str]]]]]:
    """Split a unified diff into (path, [(old start, hunk lines)]); text before the first file is a comment."""
    files: list[tuple[str, list[tuple[int, list[str]]]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            path = lines[i + 1][4:].split("\t")[0]
            files.append((path[2:] if path.startswith("b/") else path, []))
            i += 2
            continue
        match = _HUNK.match(line)
        if match and files:
            old_n = int(match.group(2) or 1)
            new_n = int(match.group(4) or 1)
            body: list[str] = []
            i += 1
            while (old_n > 0 or new_n > 0) and i < len(lines):
                tag = lines[i][:1] or " "
                if tag in " -":
                    old_n -= 1
                if tag in " +":
                    new_n -= 1
                if tag not in " -+":
                    raise PatchError(f"{files[-1][0]}: malformed hunk line {lines[i]!r}")
                body.append(lines[i] or " ")
                i += 1
            if old_n or new_n:
                raise PatchError(f"{files[-1][0]}: hunk at line {match.group(1)} is truncated")
            files[-1][1].append((int(match.group(1)), body))
            continue
        i += 1
    if not files:
        raise PatchError("no file in the patch")
    return files


def apply(tree: Path, text: str) -> list[str]:
    """Apply the unified diff ``text`` to the files under ``tree``; returns the paths changed."""
    changed = []
    for rel, hunks in _files(text):
        path = tree / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise PatchError(f"{rel}: no such file in {tree}")
        source = path.read_text(encoding="utf-8").split("\n")
        out: list[str] = []
        at = 0  # index in source of the next line not yet copied
        for start, body in hunks:
            old = [line[1:] for line in body if line[0] in " -"]
            begin = max(start - 1, 0) if old else start
            if begin < at or source[begin:begin + len(old)] != old:
                raise PatchError(f"{rel}: the hunk at line {start} does not match (a different llama.cpp?)")
            out += source[at:begin]
            out += [line[1:] for line in body if line[0] in " +"]
            at = begin + len(old)
        out += source[at:]
        path.write_text("\n".join(out), encoding="utf-8")
        changed.append(rel)
    return changed
