"""The command line's sampling defaults: the model's own recommendation (llama.cpp's
``general.sampling.*`` GGUF keys), else greedy; and a chat that answers at those defaults."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import llamabind as lb
from llamabind.cli import build_parser
from llamabind.cli.common import sampling_values
from tinymodels import write_tiny_llama

QUESTIONS = "What is the capital of France?\nAnd of Germany?\n"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamabind", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def ids(stdout: str) -> list[int]:
    """The token ids of ``generate --json`` (one object per token, then a summary)."""
    return [obj["id"] for obj in map(json.loads, stdout.splitlines()) if obj.get("id") is not None]


def test_chat_answers_the_readme_questions_at_default_settings(chat_model_path):
    """No -m, no sampling options: the default chat model, its system message, the default sampling."""
    out = cli("chat", stdin=QUESTIONS)
    assert out.returncode == 0, out.stderr
    answers = [line.removeprefix("> ") for line in out.stdout.splitlines() if line.strip("> ")]
    assert len(answers) == 2, out.stdout
    assert "Paris" in answers[0] and "Berlin" in answers[1], out.stdout


def test_the_model_recommendation_is_used_and_the_command_line_wins(tmp_path):
    keys = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 0.8,
            "general.sampling.min_p": 0.1, "general.sampling.penalty_repeat": 1.1,
            "general.sampling.penalty_last_n": 32}
    path = write_tiny_llama(tmp_path / "recommends.gguf", metadata=keys)
    with lb.Model(path) as model:
        got = sampling_values(build_parser().parse_args(["chat", "-m", path]), model)
        assert got == pytest.approx({"temp": 0.6, "top_k": 20, "top_p": 0.8, "min_p": 0.1, "repeat_penalty": 1.1,
                                     "repeat_last_n": 32})
        assert isinstance(got["top_k"], int)
        mine = build_parser().parse_args(["generate", "-m", path, "-p", "x", "--temp", "0", "--top-k", "5"])
        got = sampling_values(mine, model)
        assert got["temp"] == 0 and got["top_k"] == 5 and got["top_p"] == pytest.approx(0.8)


def test_without_a_recommendation_the_default_is_greedy(tiny_model_path):
    """Runs with different seeds give the tokens that --temp 0 gives."""
    runs = [cli("generate", "-m", tiny_model_path, "-p", "hello world", "-n", "12", "--json", *extra)
            for extra in (["--seed", "1"], ["--seed", "2"], ["--temp", "0"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    tokens = [ids(r.stdout) for r in runs]
    assert len(tokens[0]) == 12 and tokens[0] == tokens[1] == tokens[2]
    sampled = cli("generate", "-m", tiny_model_path, "-p", "hello world", "-n", "12", "--json", "--temp", "5",
                  "--top-k", "0", "--top-p", "1", "--min-p", "0", "--seed", "1")
    assert sampled.returncode == 0 and ids(sampled.stdout) != tokens[0]


def test_the_serving_example_answers_at_temperature_0(chat_model_path):
    """examples/aprender_serve.py on the default chat model: a chat without a system message answers
    (the template's own system message made it say "L'Etoile, la Marseillaise, ...")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parent.parent / "examples" / "aprender_serve.py"
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    body = json.dumps({"model": Path(chat_model_path).stem, "temperature": 0, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                urllib.request.urlopen(base + "/health", timeout=5).close()
                break
            time.sleep(0.1)
        req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
    finally:
        proc.terminate()
        proc.wait(30)
