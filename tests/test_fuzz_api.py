"""The stateful API attack harness (fuzz_api.py) on the tiny random llama, in a subprocess.

A crash (SIGSEGV, SIGABRT: a negative return code) fails the test and prints the calls the
child logged before it died, the last one being the call that crashed; a non-llamabind
exception fails it with hypothesis's shrunk sequence of calls. Re-run the printed example
with ``python tests/fuzz_api.py --replay LOG``. ``LLAMABIND_FUZZ_SEED``,
``LLAMABIND_FUZZ_EXAMPLES`` and ``LLAMABIND_FUZZ_STEPS`` change the run;
``LLAMABIND_FUZZ_AVOID=tag,tag`` skips known crash classes (``fuzz_api.py --list-tags``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

HERE = Path(__file__).resolve().parent


def last_calls(log: Path, n: int = 60) -> str:
    """The last ``n`` lines the child logged for its last example (the crashing call last)."""
    if not log.exists():
        return "(no call log written)"
    text = log.read_text(errors="replace")
    head, sep, last = text.rpartition("# ===== example")
    lines = (sep + last).splitlines() if sep else text.splitlines()
    if len(lines) > n + 1:
        lines = lines[:1] + [f"... ({len(lines) - n - 1} earlier lines of this example in {log})"] + lines[-n:]
    return "\n".join(lines)


def fatal_error(out: str, n: int = 14) -> str:
    """faulthandler's report (first frames), else the tail of the output."""
    i = out.find("Fatal Python error")
    if i < 0:
        return out[-3000:]
    return "\n".join(out[i:].splitlines()[:n])


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


@pytest.mark.slow
def test_random_api_call_sequences_do_not_crash(tmp_path):
    seed = os.environ.get("LLAMABIND_FUZZ_SEED", "0")
    examples = os.environ.get("LLAMABIND_FUZZ_EXAMPLES", "120")
    steps = os.environ.get("LLAMABIND_FUZZ_STEPS", "30")
    log = tmp_path / "fuzz_api.log"
    cmd = [sys.executable, str(HERE / "fuzz_api.py"), "--examples", examples, "--steps", steps, "--seed", seed,
           "--log", str(log), "--workdir", str(tmp_path)]
    if os.environ.get("LLAMABIND_FUZZ_AVOID"):
        cmd += ["--avoid", os.environ["LLAMABIND_FUZZ_AVOID"]]
    env = dict(os.environ, PYTHONFAULTHANDLER="1", MALLOC_PERTURB_="165")  # freed memory poisoned: a stale read shows
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode < 0:
        pytest.fail(f"fuzz_api crashed with {_signal_name(proc.returncode)} (seed {seed}); the last calls logged, "
                    f"the crashing one last:\n{last_calls(log)}\n\n--- child output (tail) ---\n{out[-4000:]}\n"
                    f"replay: python tests/fuzz_api.py --replay {log}", pytrace=False)
    assert proc.returncode == 0, f"fuzz_api found problems (seed {seed}):\n{out[-6000:]}"
    m = re.search(r"^fuzz: (\d+) examples, (\d+) calls, 0 crashes", proc.stdout, re.M)
    assert m, f"no summary line in the output:\n{out[-3000:]}"
    assert int(m.group(1)) >= int(examples) and int(m.group(2)) > int(m.group(1)), m.group(0)
