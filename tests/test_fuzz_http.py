"""The HTTP fuzzer (fuzz_http.py) against a real ``python -m llamabind serve`` on the tiny model,
a bounded number of bodies (``LLAMABIND_FUZZ_HTTP_EXAMPLES``, default 60; ``LLAMABIND_FUZZ_SEED``),
once with Qwen3's Jinja template and once without a template. It fails on any 5xx, any 4xx not
in OpenAI's error shape, a stream that ends without ``[DONE]`` or an error, or a server that
stops answering a known request with the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("plain", [False, True], ids=["jinja", "no-template"])
def test_http_fuzz(plain):
    n = os.environ.get("LLAMABIND_FUZZ_HTTP_EXAMPLES", "60")
    cmd = [sys.executable, str(HERE / "fuzz_http.py"), "--examples", n,
           "--seed", os.environ.get("LLAMABIND_FUZZ_SEED", "1")] + (["--plain"] if plain else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, p.stdout[-3000:] + p.stderr[-3000:]
    totals = json.loads(lines[-1])
    assert p.returncode == 0 and totals["5xx"] == 0 and totals["deaths"] == 0 and not totals["findings"], \
        json.dumps(totals, indent=1) + p.stderr[-3000:]
    assert totals["bodies"] >= int(n)
