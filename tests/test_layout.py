"""The package's floors show in the tree and imports run one way: cli/bench -> engine ->
generation, embeddings, mtmd -> one module per C handle -> raw (errors is shared by all)."""

from __future__ import annotations

import ast
from pathlib import Path

import llamabind

PKG = Path(llamabind.__file__).resolve().parent
SRC = Path(__file__).resolve().parent.parent / "src" / "llamabind"
ROOT = SRC if SRC.is_dir() else PKG

FLOOR = {"errors": 0, "raw": 0, "_build_info": 0, "_llamabind": 0,
         "generation": 2, "embeddings": 2, "mtmd": 2, "engine": 3, "cli": 4, "bench": 4, "server": 4, "__main__": 4,
         "__init__": 5}


def floor_of(module: str) -> int:
    """0: raw; 1: the handle modules; 2: built on handles; 3: the engine; 4: front ends."""
    return FLOOR.get(module.split(".")[0], 1)


def imports(path: Path, package: str) -> set[str]:
    """Top-level llamabind modules that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    depth = package.count(".") + 1
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: depth - node.level + 1]
                parts = (base[1:] if len(base) > 1 else []) + (node.module.split(".") if node.module else [])
                if not parts:  # from . import x / from .. import x
                    parts = [a.name for a in node.names][:1]
                found.add(parts[0])
            elif node.module and node.module.startswith("llamabind."):
                found.add(node.module.split(".")[1])
    return found


def modules() -> list[tuple[Path, str, str]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        name = ".".join(parts)
        package = "llamabind." + ".".join(parts[:-1]) if len(parts) > 1 else "llamabind"
        out.append((path, name, package))
    return out


def test_imports_run_one_way():
    bad = []
    for path, name, package in modules():
        mine = floor_of(name)
        for target in imports(path, package):
            if floor_of(target) > mine and target != name.split(".")[0]:
                bad.append(f"{name} (floor {mine}) imports {target} (floor {floor_of(target)})")
    assert not bad, bad


def test_no_module_far_over_400_lines():
    long = {name: n for path, name, _ in modules() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, long
