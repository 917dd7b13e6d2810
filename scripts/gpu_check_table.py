"""The table of scripts/gpu-check.sh: llamabind against native llama.cpp from the same build, on one
model, every row side by side in one run (see docs/gpu.md).

    python scripts/gpu_check_table.py --model M.gguf --tools build/gpu/bin [--ngl -1] [--reps 3]

Rows: pp512 and tg128 of ``generate()`` against llama-bench (alternating, ratio per pair); tg128 of
a bare decode loop in Python (llama_decode + greedy sampling through cffi) and of the same calls in
C inside the process, against llama-bench's tg128; the engine's S_TG against llama-batched-bench at
each batch size (benchmarks/bench_engine.py static). Targets are issue 23's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llamabind as lb
from llamabind import bench
from llamabind.raw import ffi, lib

ROOT = Path(__file__).resolve().parent.parent


def bare_loop_tps(ctx: lb.Context, model: lb.Model, n: int) -> float:
    """tok/s of the least Python can do per token: decode one token, sample greedily, repeat."""
    ctx.memory.clear()
    token = ffi.new("llama_token[1]", [model.vocab.bos if model.vocab.bos is not None else 1])
    with lb.Sampler.greedy() as smpl:
        t0 = time.perf_counter()
        for _ in range(n):
            if lib.llama_decode(ctx.ptr, lib.llama_batch_get_one(token, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            token[0] = lib.llama_sampler_sample(smpl.ptr, ctx.ptr, -1)
        return n / (time.perf_counter() - t0)


def c_loop_tps(ctx: lb.Context, model: lb.Model, n: int) -> float:
    """tok/s of generate()'s calls (sample, token_to_piece, decode) in C inside this process."""
    ctx.memory.clear()
    first = ffi.new("llama_token[1]", [model.vocab.bos if model.vocab.bos is not None else 1])
    out = ffi.new("llama_token[]", n)
    with lb.Sampler.greedy() as smpl:
        t0 = time.perf_counter()
        rc = lib.llama_decode(ctx.ptr, lib.llama_batch_get_one(first, 1))
        rc = rc or lib._llamabind_native_loop(ctx.ptr, smpl.ptr, n - 1, out) < 0
        dt = time.perf_counter() - t0
    if rc:
        raise RuntimeError("the C decode loop failed")
    return n / dt


def engine_rows(args: argparse.Namespace) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "static", "--model", args.model,
           "--native", args.tools, "--batches", args.batches, "--pp", "128", "--tg", "128", "--reps", "1",
           "--threads", str(args.threads), "-ngl", str(args.ngl), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.engine_timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench_engine.py static failed ({out.returncode}): {out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tools", required=True, help="directory of llama-bench and llama-batched-bench")
    ap.add_argument("--ngl", type=int, default=-1, help="layers offloaded on both sides (-1: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--engine-timeout", type=int, default=300)
    args = ap.parse_args()

    t0 = time.perf_counter()
    rows = bench.run(args.model, p=args.p, n=args.n, threads=args.threads, reps=args.reps,
                     native=str(Path(args.tools) / "llama-bench"), n_gpu_layers=args.ngl)
    by = {(r.test, r.impl): r for r in rows}
    pp, tg = f"pp{args.p}", f"tg{args.n}"
    native_tg = by[(tg, "native")].tps
    table = [(f"{pp} generate() prefill", by[(pp, "llamabind")].tps, by[(pp, "native")].tps,
              by[(pp, "llamabind")].extra["ratio"], "llama-bench", ""),
             (f"{tg} generate()", by[(tg, "llamabind")].tps, native_tg, by[(tg, "llamabind")].extra["ratio"],
              "llama-bench", ">= 0.97")]
    with lb.Model(args.model, n_gpu_layers=args.ngl) as model, \
            lb.Context(model, n_ctx=args.n + 64, n_threads=args.threads) as ctx:
        bare_loop_tps(ctx, model, 8)  # warm up
        bare = statistics.median(bare_loop_tps(ctx, model, args.n) for _ in range(args.reps))
        c = statistics.median(c_loop_tps(ctx, model, args.n) for _ in range(args.reps))
    table += [(f"{tg} bare decode loop (Python)", bare, native_tg, bare / native_tg, "llama-bench", ">= 0.99"),
              (f"{tg} same calls in C, in-process", c, native_tg, c / native_tg, "llama-bench", "")]
    for r in engine_rows(args):
        table.append((f"engine S_TG, B={r['B']}", r["engine_S_TG"], r["native_S_TG"], r["ratio_S_TG"],
                      "llama-batched-bench", ">= 0.95"))

    gpus = [f"{d.name} {d.description}" for d in lb.system.devices() if d.type in ("gpu", "igpu")]
    print(f"\nllamabind {lb.__version__} ({lb.system_info().accelerator}) on {', '.join(gpus) or 'no GPU'}; "
          f"{bench.machine_line()}; model {Path(args.model).name}, ngl {args.ngl}, {args.threads} threads, "
          f"median of {args.reps}\n")
    print("| measure | llamabind tok/s | native tok/s | ratio | native | target |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for name, ours, native, ratio, tool, target in table:
        print(f"| {name} | {ours:.1f} | {native:.1f} | {ratio:.3f} | {tool} | {target} |")
    print(f"\n(table measured in {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
