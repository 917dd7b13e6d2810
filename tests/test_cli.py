"""The command line, run as a user would: python -m llamabind ..."""

from __future__ import annotations

import json
import subprocess
import sys

import llamabind as lb


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamabind", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_generate_json_stream(gemma_path, gemma_model):
    out = cli("generate", "-m", gemma_path, "-p", "The capital of France is", "-n", "12", "--temp", "0",
              "-t", "2", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    *tokens, final = lines
    assert final["finish_reason"] in ("length", "stop") and final["usage"]["completion_tokens"] == len(tokens)
    assert all(set(t) == {"id", "text"} for t in tokens)
    with lb.Context(gemma_model, n_ctx=512, n_threads=2) as ctx:
        assert [t["id"] for t in tokens] == lb.complete(ctx, "The capital of France is", max_tokens=12).tokens
    assert out.stderr == ""  # llama.cpp's log goes to logging (errors only by default)


def test_generate_text_and_grammar(tmp_path, gemma_path):
    g = tmp_path / "yn.gbnf"
    g.write_text('root ::= "yes" | "no"\n')
    out = cli("generate", "-m", gemma_path, "-p", "Is water wet? Answer:", "-n", "8", "--grammar-file", str(g),
              "--seed", "3", "-t", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("yes", "no")


def test_generate_bad_model_is_one_clear_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    out = cli("generate", "-m", str(bad), "-p", "hi")
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_chat_reuses_the_cache(gemma_path):
    out = cli("chat", "-m", gemma_path, "-n", "8", "--temp", "0", "-t", "2", "-v",
              stdin="Say hi.\nAnd again.\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") >= 2
    cached = [l for l in out.stderr.splitlines() if "prompt tokens from cache" in l]
    assert len(cached) == 2 and cached[0].startswith("[0/") and not cached[1].startswith("[0/")


def test_main_job_uses_the_default_model(gemma_path):
    """The README's main job: no -m, the gemma3-270m model from the llamabind[model] packages."""
    out = cli("generate", "-p", "The capital of France is", "-n", "6", "--temp", "0", "-t", "2")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 3 and "6 generated" in out.stderr
