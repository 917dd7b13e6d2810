"""The engine against native llama.cpp from the same tree, side by side in one run.

    static    the engine at B = 1, 2, 4, 8, 16 against llama-batched-bench, alternating
    trace     a Poisson trace (prompts 64-1,500 tokens, half on a shared 500-token system prompt,
              16-256 new tokens): the engine in-process against llama-server over HTTP
    overhead  Python time per step outside llama_decode, per active request (tiny model)
    ngram     n-gram (and --draft-model) drafts on a copying task: decode tok/s with and without,
              same greedy output
    prefix    16 requests on one 1,000-token system prompt: prompt tokens decoded and TTFT, against
              the same prompts made unshareable

Run: ``python benchmarks/bench_engine.py static --native build/dev/bin`` (``--help`` per command).
The model defaults to gemma3-270m from llamabind[model]; ``--json`` prints one JSON row per line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import llamabind as lb
from llamabind.bench import native_ngl
from llamabind.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


def tokens(model: lb.Model, n: int, rng: np.random.Generator) -> list[int]:
    return [int(t) for t in rng.integers(100, min(model.vocab.n_tokens, 30000), size=n)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else 0.0


# -- 1. static batches ----------------------------------------------------------------------------
def engine_static(model: lb.Model, b: int, pp: int, tg: int, threads: int) -> dict:
    rng = np.random.default_rng(b)
    with Engine.load(model, n_slots=b, n_ctx=b * (pp + tg) + 64, n_batch=2048, n_ubatch=512, n_threads=threads,
                     swa_full=False) as eng:
        ids = [eng.submit(prompt=tokens(model, pp, rng), max_tokens=tg, ignore_eog=True) for _ in range(b)]
        t0 = time.perf_counter()
        firsts: set[int] = set()
        t_pp = 0.0
        while eng.has_work:
            for ev in eng.step():
                if isinstance(ev, lb.TokenEvent) and ev.index not in firsts:
                    firsts.add(ev.index)
                    if len(firsts) == len(ids):
                        t_pp = time.perf_counter() - t0
        t = time.perf_counter() - t0
    return {"S_PP": b * pp / t_pp, "S_TG": b * (tg - 1) / (t - t_pp), "S": b * (pp + tg) / t}


# llama-batched-bench writes its results through llama.cpp's asynchronous logger and returns from
# main() without common_log_flush() (which common/log.h asks for), so on a busy machine the process
# often exits before the logger's thread has printed anything: exit code 0 and no output at all.
# The executable's main() only calls llama_batched_bench() from libllama-batched-bench-impl, so the
# harness calls that same function and then flushes the logger, as the tool should.
_NATIVE_RUNNER = """
import ctypes, sys
tools, args = sys.argv[1], sys.argv[2:]
common = ctypes.CDLL(tools + "/libllama-common.so", mode=ctypes.RTLD_GLOBAL)
impl = ctypes.CDLL(tools + "/libllama-batched-bench-impl.so")
argv = (ctypes.c_char_p * (len(args) + 2))(b"llama-batched-bench", *[a.encode() for a in args], None)
rc = impl._Z19llama_batched_benchiPPc(len(args) + 1, argv)
common._Z15common_log_mainv.restype = ctypes.c_void_p
common._Z16common_log_flushP10common_log(ctypes.c_void_p(common._Z15common_log_mainv()))
sys.stdout.flush()
sys.exit(rc)
"""


def native_static(tool: Path, model_path: str, b: int, pp: int, tg: int, threads: int, ngl: int) -> dict:
    args = ["-m", model_path, "-ngl", native_ngl(ngl), "-c", str(b * (pp + tg) + 64), "-b", "2048", "-ub", "512",
            "-npp", str(pp), "-ntg", str(tg), "-npl", str(b), "-t", str(threads), "-kvu", "--output-format", "jsonl"]
    out = subprocess.run([sys.executable, "-c", _NATIVE_RUNNER, str(tool.parent), *args],
                         capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            d = json.loads(line)
            return {"S_PP": d["speed_pp"], "S_TG": d["speed_tg"], "S": d["speed"]}
    raise RuntimeError(f"llama-batched-bench ({tool.parent}) printed no result: exit code {out.returncode}, "
                       f"stdout {out.stdout[-800:]!r}, stderr {out.stderr[-800:]!r}")


def static(args: argparse.Namespace, model: lb.Model) -> list[dict]:
    tool = Path(args.native) / "llama-batched-bench"
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        ours, theirs = [], []
        for _ in range(args.reps):
            theirs.append(native_static(tool, args.model, b, args.pp, args.tg, args.threads, args.ngl))
            ours.append(engine_static(model, b, args.pp, args.tg, args.threads))
        row = {"bench": "static", "B": b, "pp": args.pp, "tg": args.tg}
        for k in ("S_PP", "S_TG", "S"):
            row[f"engine_{k}"] = statistics.median(o[k] for o in ours)
            row[f"native_{k}"] = statistics.median(t[k] for t in theirs)
            row[f"ratio_{k}"] = statistics.median(o[k] / t[k] for o, t in zip(ours, theirs))
        rows.append(row)
        emit(args, row)
    return rows


# -- 2. a dynamic trace ---------------------------------------------------------------------------
def make_trace(model: lb.Model, n: int, rate: float, seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    system = tokens(model, 500, rng)
    bos = [model.vocab.bos] if model.vocab.bos is not None else []
    t, trace = 0.0, []
    for i in range(n):
        t += float(rng.exponential(1.0 / rate))
        length = int(rng.integers(64, 1501))
        own = tokens(model, length, rng)
        prompt = bos + (system + own)[:length] if i % 2 == 0 and length > 500 else bos + own
        trace.append({"at": t, "prompt": prompt, "max_tokens": int(rng.integers(16, 257))})
    return trace


def summarize(name: str, recs: list[dict], wall: float) -> dict:
    ttft = [r["first"] - r["at"] for r in recs]
    itl = [b - a for r in recs for a, b in zip(r["times"], r["times"][1:])]
    n_out = sum(len(r["times"]) for r in recs)
    return {"bench": "trace", "impl": name, "requests": len(recs), "tokens": n_out, "wall_s": wall,
            "throughput": n_out / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95)}


def engine_trace(model: lb.Model, trace: list[dict], np_: int, n_ctx: int, threads: int,
                 prefill_budget: int | None = None) -> dict:
    with Engine.load(model, n_slots=np_, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=threads,
                     swa_full=True, prefill_budget=prefill_budget) as eng:
        recs: dict[int, dict] = {}
        t0 = time.perf_counter()
        todo = list(trace)
        while todo or eng.has_work:
            now = time.perf_counter() - t0
            while todo and todo[0]["at"] <= now:
                r = todo.pop(0)
                rid = eng.submit(prompt=r["prompt"], max_tokens=r["max_tokens"], ignore_eog=True)
                recs[rid] = {"at": r["at"], "first": 0.0, "times": []}
            if not eng.has_work:
                time.sleep(max(0.0, todo[0]["at"] - now))
                continue
            for ev in eng.step():
                if isinstance(ev, lb.TokenEvent) and ev.token is not None:
                    rec = recs[ev.index]
                    t = ev.time - t0
                    rec["first"] = rec["first"] or t
                    rec["times"].append(t)
        return summarize("engine", list(recs.values()), time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_trace(tool: Path, model_path: str, trace: list[dict], np_: int, n_ctx: int, threads: int,
                 ngl: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([str(tool), "-m", model_path, "-ngl", native_ngl(ngl), "--host", "127.0.0.1",
                             "--port", str(port), "-np", str(np_),
                             "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-t", str(threads), "-tb", str(threads),
                             "-kvu", "--swa-full", "--cont-batching", "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        recs: list[dict] = []
        t0 = time.perf_counter()

        def one(r: dict) -> None:
            time.sleep(max(0.0, r["at"] - (time.perf_counter() - t0)))
            rec = {"at": r["at"], "first": 0.0, "times": []}
            body = json.dumps({"prompt": r["prompt"], "n_predict": r["max_tokens"], "ignore_eos": True,
                               "temperature": 0, "top_k": 1, "stream": True, "cache_prompt": True,
                               "return_tokens": True})
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request("POST", "/completion", body, {"Content-Type": "application/json"})
            resp = c.getresponse()
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                d = json.loads(line[6:])
                n = len(d.get("tokens") or ())
                t = time.perf_counter() - t0
                for _ in range(n):
                    rec["first"] = rec["first"] or t
                    rec["times"].append(t)
                if d.get("stop"):
                    break
            recs.append(rec)

        threads_ = [threading.Thread(target=one, args=(r,)) for r in trace]
        for th in threads_:
            th.start()
        for th in threads_:
            th.join()
        return summarize("llama-server", recs, time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)


def trace_bench(args: argparse.Namespace, model: lb.Model) -> list[dict]:
    trace = make_trace(model, args.requests, args.rate)
    n_ctx = args.np * 2048
    rows = []
    for rep in range(args.reps):
        for name in ("llama-server", "engine") if rep % 2 == 0 else ("engine", "llama-server"):
            if args.only and name != args.only:
                continue
            if name == "engine":
                row = engine_trace(model, trace, args.np, n_ctx, args.threads, args.prefill_budget)
            else:
                row = server_trace(Path(args.native) / "llama-server", args.model, trace, args.np, n_ctx, args.threads,
                                   args.ngl)
            row["rep"] = rep
            rows.append(row)
            emit(args, row)
    return rows


# -- 5. a shared system prompt ----------------------------------------------------------------------
def prefix_run(model: lb.Model, prompts: list[list[int]], max_tokens: int, threads: int) -> dict:
    """All requests at once on as many slots; prompt tokens really decoded, TTFT, wall time."""
    n_ctx = sum(len(p) + max_tokens for p in prompts) + 256
    with Engine.load(model, n_slots=len(prompts), n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=threads) as eng:
        t0 = time.perf_counter()
        ids = [eng.submit(prompt=p, max_tokens=max_tokens, ignore_eog=True) for p in prompts]
        done = {e.index: e for e in eng.run() if isinstance(e, lb.DoneEvent)}
        wall = time.perf_counter() - t0
        decoded = eng.metrics().tokens_decoded
    ds = [done[i] for i in ids]
    ttft = [d.metrics.ttft_s for d in ds]
    return {"prompt_tokens": sum(d.usage.prompt_tokens for d in ds),
            "prompt_tokens_decoded": sum(d.usage.prompt_tokens - d.usage.cached_tokens for d in ds),
            "rows_decoded": decoded, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "ttft_max": max(ttft), "wall_s": wall}


def prefix(args: argparse.Namespace, model: lb.Model) -> list[dict]:
    """``--requests`` requests on one ``--system``-token system prompt, each with its own question,
    against the same prompts made unshareable (each starts with a token of its own: same lengths)."""
    rng = np.random.default_rng(5)
    bos = [model.vocab.bos] if model.vocab.bos is not None else []
    system = tokens(model, args.system, rng)
    questions = [tokens(model, 24, rng) for _ in range(args.requests)]
    shared = [bos + system + q for q in questions]
    alone = [bos + [200 + i] + system[1:] + q for i, q in enumerate(questions)]
    rows = []
    for rep in range(args.reps):
        for share in (True, False) if rep % 2 == 0 else (False, True):
            row = {"bench": "prefix", "sharing": share, "requests": args.requests, "system_tokens": args.system,
                   "rep": rep, **prefix_run(model, shared if share else alone, args.max_tokens, args.threads)}
            rows.append(row)
            emit(args, row)
    return rows


# -- 3. Python cost per step ------------------------------------------------------------------------
def overhead(args: argparse.Namespace, model: lb.Model) -> list[dict]:
    rows = []
    for n in [int(x) for x in args.active.split(",")]:
        best = float("inf")
        for _ in range(args.reps):
            with Engine.load(model, n_slots=n, n_ctx=n * 320, n_threads=args.threads) as eng:
                for i in range(n):
                    eng.submit(prompt=[1, 100 + i, 200 + i], max_tokens=256, ignore_eog=True)
                for _ in range(8):
                    eng.step()  # prefill done, all generating
                m0 = eng.metrics()
                for _ in range(200):
                    eng.step()
                m1 = eng.metrics()
            py = (m1.step_s - m0.step_s) - (m1.decode_s - m0.decode_s)
            best = min(best, py / (m1.steps - m0.steps) / n * 1e6)
        row = {"bench": "overhead", "active": n, "us_per_request_step": best}
        rows.append(row)
        emit(args, row)
    return rows


# -- 4. n-gram speculation ------------------------------------------------------------------------
SNIPPET = '''def load_config(path):
    """Read a JSON configuration file and fill in the defaults."""
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    data.setdefault("host", "127.0.0.1")
    data.setdefault("port", 8080)
    data.setdefault("workers", 4)
    data.setdefault("timeout", 30)
    for key in ("host", "port", "workers", "timeout"):
        if key not in data:
            raise KeyError(key)
    if data["port"] <= 0 or data["port"] > 65535:
        raise ValueError("port out of range")
    if data["workers"] < 1:
        raise ValueError("need at least one worker")
    return data


def save_config(path, data):
    """Write the configuration back, sorted and indented."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4, sort_keys=True)
'''


def ngram(args: argparse.Namespace, model: lb.Model) -> list[dict]:
    """Decode tok/s without drafts, with n-gram drafts and (``--draft-model``) with a draft model's,
    in alternating order; ``same_output``: the greedy tokens of the first run without drafts."""
    prompt = ("Here is a Python module.\n\n" + SNIPPET + "\nThe same module, with the default port changed "
              "from 8080 to 9090 and nothing else changed:\n\n")
    n = len(model.vocab.tokenize(SNIPPET))
    drafter = lb.Model(args.draft_model, n_gpu_layers=args.ngl) if args.draft_model else None
    kinds = ["none", "ngram"] + (["model"] if drafter is not None else [])
    rows: list[dict] = []
    ref: list[int] | None = None
    for rep in range(args.reps):
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            k = 0 if kind == "none" else args.n_draft
            with Engine.load(model, n_slots=1, n_ctx=2048, n_threads=args.threads,
                             draft_model=drafter if kind == "model" else None) as eng:
                rid = eng.submit(prompt=prompt, max_tokens=n, n_draft=k, draft="auto" if kind == "none" else kind)
                done = [e for e in eng.run() if isinstance(e, lb.DoneEvent) and e.index == rid][0]
            if kind == "none" and ref is None:
                ref = done.tokens
            rows.append({"bench": "ngram", "draft": kind, "n_draft": k, "decode_tps": done.metrics.decode_tps,
                         "accepted": done.metrics.accepted_tokens, "drafted": done.metrics.drafted_tokens,
                         "same_output": done.tokens == ref if ref is not None else None, "tokens": len(done.tokens),
                         "rep": rep})
            emit(args, rows[-1])
    if drafter is not None:
        drafter.close()
    return rows


def emit(args: argparse.Namespace, row: dict) -> None:
    print(json.dumps(row) if args.json else "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in row.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["static", "trace", "overhead", "ngram", "prefix"])
    ap.add_argument("--model", help="GGUF (default: gemma3-270m from llamabind[model])")
    ap.add_argument("--native", default=str(ROOT / "build" / "dev" / "bin"), help="directory of the native tools")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-ngl", "--ngl", type=int, default=0,
                    help="layers offloaded on both sides (-1: all; default 0: the CPU, as the engine's default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--requests", type=int, help="trace: 24; prefix: 16")
    ap.add_argument("--system", type=int, default=1000, help="prefix: system prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=16, help="prefix: tokens generated per request")
    ap.add_argument("--rate", type=float, default=0.25, help="arrivals per second")
    ap.add_argument("--np", type=int, default=4, help="slots on both sides")
    ap.add_argument("--active", default="1,8,32")
    ap.add_argument("--prefill-budget", type=int, help="the engine's prompt tokens per step while others generate")
    ap.add_argument("--only", choices=["engine", "llama-server"], help="trace: run one side only")
    ap.add_argument("--n-draft", type=int, default=12)
    ap.add_argument("--draft-model", help="ngram: also a draft model's drafts (a GGUF with a compatible vocabulary)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 16 if args.bench == "prefix" else 24
    if args.model is None:
        from llamabind.models import default_model_path
        args.model = str(default_model_path())
    with lb.Model(args.model, n_gpu_layers=args.ngl) as model:
        benches = {"static": static, "trace": trace_bench, "overhead": overhead, "ngram": ngram, "prefix": prefix}
        benches[args.bench](args, model)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
