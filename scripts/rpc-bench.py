"""pp/tg of one model through ggml's RPC backend on loopback against a local run (llamabind, +rpc builds).

Starts ``--servers`` rpc-servers on 127.0.0.1 (``-t --threads`` each), then alternates local and RPC
runs ``--reps`` times and prints the median tok/s of each. Usage (gemma3-270m by default):
``python scripts/rpc-bench.py [--model PATH] [--servers 2] [--threads 2] [--reps 3]``
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import time

import llamabind as lb
from llamabind import bench, rpc


def start(threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([rpc.server_path(), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    for _ in range(200):  # bounded: 20 s
        try:
            rpc.check_endpoint(endpoint, timeout=1)
            return proc, endpoint
        except lb.ModelLoadError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"rpc-server on {endpoint} did not start")


def measure(path: str, threads: int, p: int, n: int, **load) -> tuple[float, float]:
    with lb.Model(path, **load) as model, lb.Context(model, n_ctx=p + n + 16, n_batch=p, n_threads=threads) as ctx:
        tokens = bench._random_tokens(model, p)
        bench.pp_once(ctx, tokens[:32])  # warm-up
        return bench.pp_once(ctx, tokens), bench.tg_once(ctx, model, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: gemma3-270m from llamabind[model])")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args()
    if args.model is None:
        from llamabind.models import default_model_path
        args.model = str(default_model_path())
    servers = [start(args.threads) for _ in range(args.servers)]
    runs = {"local": {}, "local, no repack": {"use_extra_bufts": False},
            f"rpc x{args.servers}": {"rpc_servers": [e for _, e in servers], "n_gpu_layers": -1}}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    try:
        for _ in range(args.reps):
            for name, load in runs.items():
                results[name].append(measure(args.model, args.threads, args.p, args.n, **load))
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()
    print(f"| run | pp{args.p} tok/s | tg{args.n} tok/s |\n| --- | ---: | ---: |")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.1f} | {statistics.median(r[1] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
