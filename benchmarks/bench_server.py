"""llamabind's OpenAI server against native llama-server, HTTP to HTTP, on bench_engine.py's trace.

The same Poisson trace (``bench_engine.make_trace``: prompts of 64-1,500 tokens, half on a shared
500-token system prompt, 16-256 new tokens, greedy, end of generation ignored) goes to
``python -m llamabind serve`` (streamed ``/v1/completions``, one thread per request) and to
``llama-server -np N -kvu --swa-full --cont-batching`` (bench_engine's own driver, streamed
``/completion``), in alternating order, both on 127.0.0.1 with the same slots, cells and threads.

Run: ``python benchmarks/bench_server.py --native build/dev/bin`` (model: gemma3-270m from
llamabind[model] unless ``--model``); ``--json`` prints one JSON row per line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamabind as lb  # noqa: E402
from bench_engine import ROOT, emit, free_port, make_trace, server_trace, summarize  # noqa: E402


def _wait_ready(port: int, proc: subprocess.Popen) -> None:
    for _ in range(1200):  # at most about two minutes
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not come up")


def ours_trace(model_path: str, trace: list[dict], np_: int, n_ctx: int, threads: int, ngl: int) -> dict:
    """The trace against ``python -m llamabind serve`` over streamed /v1/completions."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamabind", "serve", "-m", model_path, "--port", str(port),
                             "--slots", str(np_), "--ctx", str(n_ctx), "-b", "2048", "-ub", "512",
                             "-t", str(threads), "-ngl", str(ngl), "--alias", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port, proc)
        recs: list[dict] = []
        t0 = time.perf_counter()

        def one(r: dict) -> None:
            time.sleep(max(0.0, r["at"] - (time.perf_counter() - t0)))
            rec = {"at": r["at"], "first": 0.0, "times": []}
            body = json.dumps({"model": "bench", "prompt": r["prompt"], "max_tokens": r["max_tokens"],
                               "ignore_eos": True, "temperature": 0, "stream": True,
                               "stream_options": {"include_usage": True}})
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            n = 0
            for line in c.getresponse():
                if not line.startswith(b"data: {"):
                    continue
                d = json.loads(line[6:])
                t = time.perf_counter() - t0
                if d.get("usage"):
                    n = d["usage"]["completion_tokens"]
                elif d["choices"] and d["choices"][0]["text"]:
                    rec["first"] = rec["first"] or t
                    rec["times"].append(t)
            rec["times"] += rec["times"][-1:] * (n - len(rec["times"]))  # tokens whose text came out together
            recs.append(rec)

        workers = [threading.Thread(target=one, args=(r,)) for r in trace]
        for th in workers:
            th.start()
        for th in workers:
            th.join()
        return summarize("llamabind-server", recs, time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: gemma3-270m from llamabind[model])")
    ap.add_argument("--native", default=str(ROOT / "build" / "dev" / "bin"), help="directory of llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=0.25, help="arrivals per second")
    ap.add_argument("--np", type=int, default=4, help="slots on both sides")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                    help="layers offloaded on both sides (-1: all; default 0, the CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        from llamabind.models import default_model_path
        args.model = str(default_model_path())
    with lb.Model(args.model, vocab_only=True) as model:
        trace = make_trace(model, args.requests, args.rate)
    n_ctx = args.np * 2048
    tool = Path(args.native) / "llama-server"
    for rep in range(args.reps):
        for name in ("llama-server", "llamabind-server") if rep % 2 == 0 else ("llamabind-server", "llama-server"):
            if name == "llama-server":
                row = server_trace(tool, args.model, trace, args.np, n_ctx, args.threads, args.n_gpu_layers)
            else:
                row = ours_trace(args.model, trace, args.np, n_ctx, args.threads, args.n_gpu_layers)
            row.update(bench="server", rep=rep)
            emit(args, row)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
