"""The chat oracle: native llama-server from the same tree (its POST /apply-template renders a
request exactly as the server would), and tiny models carrying llama.cpp's real vocabularies."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Which of llama.cpp's test vocabularies (models/ggml-vocab-<name>.gguf) a template's model family
# uses; the special tokens its template prints then exist as tokens. Others get the tiny vocabulary.
VOCAB_OF = [
    ("qwen3.5", "qwen35"), ("qwen", "qwen2"), ("qwq", "qwen2"), ("deepseek-r1-distill-qwen", "qwen2"),
    ("llama-3", "llama-bpe"), ("hermes-2-pro-llama-3", "llama-bpe"), ("hermes-3-llama-3", "llama-bpe"),
    ("deepseek-r1-distill-llama", "llama-bpe"), ("firefunction", "llama-bpe"), ("functionary", "llama-bpe"),
    ("phi-3", "phi-3"), ("command-r", "command-r"), ("cohere", "command-r"), ("gemma-4", "gemma-4"),
    ("deepseek", "deepseek-llm"),
]


def vocab_for(template_name: str) -> str | None:
    low = template_name.lower()
    for key, vocab in VOCAB_OF:
        if key in low:
            return vocab
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A native llama-server on 127.0.0.1 for one model and chat template file."""

    def __init__(self, binary: Path, model: str, template_file: Path | None = None, *extra: str) -> None:
        self.port = free_port()
        args = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-c", "512", "-t", "1",
                "-np", "1", "--no-warmup", *extra]
        if template_file is not None:
            args += ["--chat-template-file", str(template_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{err[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("llama-server did not become healthy in 60 s")
            time.sleep(0.05)

    def get(self, path: str) -> tuple[int, Any]:
        return self._call(urllib.request.Request(f"http://127.0.0.1:{self.port}{path}"))

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return self._call(req)

    @staticmethod
    def _call(req: urllib.request.Request) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
