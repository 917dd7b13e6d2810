"""Benchmark harness: llamabind's decode loop against native llama.cpp (llama-bench) in one run.

Rows follow llama-bench's names (``pp512``, ``tg128``). Native runs alternate with ours
(A B A B ...), so a noisy machine hurts both sides alike; the ratio is taken per pair.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .raw import ffi, lib
from .context import Context
from .generation import DoneEvent, generate, generate_many
from .model import Model
from .sampler import Sampler


@dataclass
class Row:
    """One measured row: ``tps`` is the median over repetitions."""

    test: str
    impl: str
    tps: float
    tps_min: float
    tps_max: float
    n_threads: int
    model: str
    samples: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_json(self) -> str:
        d = asdict(self)
        d.pop("samples")
        d.update(d.pop("extra"))
        return json.dumps(d)


def _row(test: str, impl: str, samples: list[float], n_threads: int, model: str, **extra) -> Row:
    return Row(test, impl, statistics.median(samples), min(samples), max(samples), n_threads, model,
               samples, extra)


def _random_tokens(model: Model, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = model.vocab
    toks = rng.integers(100, min(v.n_tokens, 30000), size=n, dtype=np.int32)
    if v.bos is not None:
        toks[0] = v.bos
    return toks


def pp_once(ctx: Context, tokens: np.ndarray) -> float:
    """Prompt tok/s of one prefill through ``generate`` (cache cleared first)."""
    ctx.memory.clear()
    t0 = time.perf_counter()
    for ev in generate(ctx, tokens, max_tokens=1, reuse_cache=False, ignore_eog=True):
        if not isinstance(ev, DoneEvent):
            dt = time.perf_counter() - t0
    return tokens.size / dt


def tg_once(ctx: Context, model: Model, n: int) -> float:
    """Generation tok/s of ``n`` decodes through ``generate`` (greedy, ignoring end-of-generation)."""
    ctx.memory.clear()
    start = [model.vocab.bos if model.vocab.bos is not None else 1]
    t0 = time.perf_counter()
    for _ in generate(ctx, start, max_tokens=n, reuse_cache=False, ignore_eog=True):
        pass
    return n / (time.perf_counter() - t0)


def native_ngl(n_gpu_layers: int) -> str:
    """``n_gpu_layers`` as the ``-ngl`` of llama.cpp's common tools: a negative count (every layer)
    is ``all`` there, since their ``-1`` means ``auto`` (fit to free memory)."""
    return "all" if n_gpu_layers < 0 else str(n_gpu_layers)


def native_once(bench: Path, model_path: str, p: int, n: int, threads: int, n_gpu_layers: int = 0) -> float:
    """One llama-bench measurement (its own timing of the test, model load excluded), with the
    same layers offloaded as ours (llama-bench passes ``-ngl`` to llama.cpp as is: negative is all)."""
    cmd = [str(bench), "-m", model_path, "-p", str(p), "-n", str(n), "-t", str(threads), "-r", "1",
           "-o", "jsonl", "-ngl", str(n_gpu_layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    if result["n_gpu_layers"] != n_gpu_layers:
        raise RuntimeError(f"llama-bench ran with -ngl {result['n_gpu_layers']}, not {n_gpu_layers}")
    return float(result["avg_ts"])


def per_token_overhead(ctx: Context, model: Model, n: int = 256, reps: int = 5) -> tuple[list[float], list[float]]:
    """Seconds per token: llamabind's full loop vs a native C loop making the same calls."""
    ours, native = [], []
    start = [model.vocab.bos if model.vocab.bos is not None else 1]
    out = ffi.new("llama_token[]", n)
    for _ in range(reps):
        ctx.memory.clear()
        t0 = time.perf_counter()
        for _ in generate(ctx, start, max_tokens=n, reuse_cache=False, ignore_eog=True):
            pass
        ours.append((time.perf_counter() - t0) / n)
        ctx.memory.clear()
        with Sampler.greedy() as smpl:
            b = ffi.new("llama_token[]", start)
            t0 = time.perf_counter()
            lib.llama_decode(ctx.ptr, lib.llama_batch_get_one(b, 1))
            rc = lib._llamabind_native_loop(ctx.ptr, smpl.ptr, n - 1, out)
            native.append((time.perf_counter() - t0) / n)
        if rc < 0:
            raise RuntimeError(f"native loop failed: {rc}")
    return ours, native


def parallel_tps(ctx: Context, model: Model, k: int, n: int) -> float:
    """Aggregate generation tok/s for ``k`` sequences decoded together."""
    ctx.memory.clear()
    prompts = [_random_tokens(model, 8, seed=i) for i in range(k)]
    t0 = time.perf_counter()
    total = 0
    for ev in generate_many(ctx, prompts, max_tokens=n, ignore_eog=True):
        if isinstance(ev, DoneEvent):
            total += ev.usage.completion_tokens
    return total / (time.perf_counter() - t0)


SEP = "<#sep#>"

_WORDS = ("the a an of to in on for with from by at about over under after before quick brown lazy "
          "small large red green blue old new happy sad fast slow bright dark cat dog fox bird river "
          "mountain city house car train market company engineer teacher student child garden music "
          "book paper idea system model network data question answer runs jumps reads writes builds "
          "sees finds makes takes gives thinks walks sings plays learns opens closes today yesterday "
          "tomorrow quietly loudly carefully quickly again never always").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences of 5-40 words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(5, 41))
        words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), k)]
        out.append(" ".join(words).capitalize() + ".")
    return out



def _stamp(line: str) -> float:
    """Seconds of a common-log timestamp ``M.SS.mmm.uuu`` at the start of a log line."""
    m, sec, ms, us = (int(x) for x in line.split()[0].split("."))
    return m * 60 + sec + ms / 1e3 + us / 1e6


def native_embed_once(tool: str, model: str, texts: list[str], threads: int,
               n_batch: int, n_gpu_layers: int = 0) -> tuple[float, float, float, int]:
    """(compute seconds, wall seconds minus load, prompt-eval seconds, n_tokens) of one llama-embedding run.

    Compute is read from the tool's timestamped log: from its first ``batch_decode`` line to
    its ``llama_perf_context_print`` line, i.e. every batch plus formatting the output.
    """
    cmd = [tool, "-m", model, "-p", SEP.join(texts), "--embd-separator", SEP, "--no-escape", "-t", str(threads),
           "-tb", str(threads), "-c", str(n_batch), "-b", str(n_batch), "-ub", str(n_batch),
           "-ngl", native_ngl(n_gpu_layers),
           "--embd-output-format", "array", "-lv", "4", "--perf", "--log-timestamps"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"llama-embedding failed: {r.stderr[-2000:]}")
    lines = r.stderr.splitlines()
    first = next(ln for ln in lines if "batch_decode:" in ln)
    last = next(ln for ln in lines if "llama_perf_context_print" in ln)
    pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", r.stderr)
    load = re.search(r"load time =\s*([\d.]+) ms", r.stderr)
    return (_stamp(last) - _stamp(first), wall - (float(load.group(1)) / 1e3 if load else 0.0),
            float(pe.group(1)) / 1e3 if pe else float("nan"), int(pe.group(2)) if pe else -1)


def embed_rows(model_path: str, threads: int, reps: int, native: Path | None, n_texts: int = 256,
               n_batch: int = 512, n_gpu_layers: int = 0) -> list[Row]:
    """Texts/s for ``n_texts`` sentences: batched, one by one, and native llama-embedding (its batches)."""
    from .embeddings import Embedder

    texts = sentences(n_texts)
    name = Path(model_path).name
    tool = native.parent / "llama-embedding" if native is not None else None
    with (Model(model_path, n_gpu_layers=n_gpu_layers) as model,
          Embedder(model, n_ctx=n_batch, n_batch=n_batch, n_threads=threads) as emb):
        emb.embed(texts)  # warm up
        batched, single, nat = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            emb.embed(texts)
            batched.append(n_texts / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for t in texts:
                emb.embed([t])
            single.append(n_texts / (time.perf_counter() - t0))
            if tool is not None and tool.is_file():
                nat.append(n_texts / native_embed_once(str(tool), model_path, texts, threads, n_batch,
                                                      n_gpu_layers)[0])
    test = f"embed{n_texts}"
    rows = [_row(test, "llamabind", batched, threads, name, unit="texts/s"),
            _row(test + "-1by1", "llamabind", single, threads, name, unit="texts/s")]
    if nat:
        ratios = [a / b for a, b in zip(batched, nat)]
        rows[0].extra.update(ratio=statistics.median(ratios))
        rows.append(_row(test, "native", nat, threads, name, unit="texts/s"))
    return rows


def llama_cpp_python_rows(model_path: str, n: int, threads: int, reps: int,
                          embed_model: str | None, n_gpu_layers: int = 0) -> list[Row]:
    """The same tg / embed rows through llama-cpp-python, when it is installed (else none)."""
    try:
        import llama_cpp
    except ImportError:
        return []
    rows = []
    llm = llama_cpp.Llama(model_path, n_ctx=n + 64, n_threads=threads, n_threads_batch=threads,
                          n_gpu_layers=n_gpu_layers, verbose=False)
    samples = []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion("", max_tokens=n, temperature=0.0)
        samples.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    rows.append(_row(f"tg{n}", "llama-cpp-python", samples, threads, Path(model_path).name,
                     api="create_completion"))
    del llm
    if embed_model:
        emb = llama_cpp.Llama(embed_model, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                              n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                              verbose=False)
        texts = sentences(256)
        emb.embed(texts[:8])
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            emb.embed(texts)
            samples.append(len(texts) / (time.perf_counter() - t0))
        rows.append(_row("embed256", "llama-cpp-python", samples, threads, Path(embed_model).name,
                         unit="texts/s"))
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model_path: str, *, p: int = 512, n: int = 128, threads: int | None = None, reps: int = 5,
        native: str | None = None, parallel: Iterable[int] = (), overhead_model: str | None = None,
        embed_model: str | None = None, n_gpu_layers: int = 0,
        emit: Callable[[Row], None] = lambda r: None) -> list[Row]:
    """Measure every requested row; ``emit`` is called as each row completes. ``n_gpu_layers``
    (negative: all) is offloaded on both sides, llamabind's and the native tools'."""
    threads = threads or os.cpu_count() or 1
    name = Path(model_path).name
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        emit(row)

    t0 = time.perf_counter()
    model = Model(model_path, n_gpu_layers=n_gpu_layers)
    load_s = time.perf_counter() - t0
    bench = Path(native) if native else None
    if bench is not None and bench.is_dir():
        bench = bench / "llama-bench"
    with model, Context(model, n_ctx=max(p, n) + 64, n_batch=max(p, 512), n_threads=threads) as ctx:
        tokens = _random_tokens(model, p)
        pp_once(ctx, tokens)  # warm up
        tg_once(ctx, model, 8)
        for test, ours_fn, args in ((f"pp{p}", lambda: pp_once(ctx, tokens), (p, 0)),
                                    (f"tg{n}", lambda: tg_once(ctx, model, n), (0, n))):
            if not args[0] and not args[1]:
                continue
            a, b = [], []
            for _ in range(reps):
                a.append(ours_fn())
                if bench is not None:
                    b.append(native_once(bench, model_path, *args, threads, n_gpu_layers))
            if b:
                ratios = [x / y for x, y in zip(a, b)]
                add(_row(test, "llamabind", a, threads, name, ratio=statistics.median(ratios),
                         ratio_min=min(ratios), ratio_max=max(ratios)))
                add(_row(test, "native", b, threads, name))
            else:
                add(_row(test, "llamabind", a, threads, name))
        ks = list(parallel)
        if ks:
            with Context(model, n_ctx=(n + 16) * max(ks), n_seq_max=max(ks), n_threads=threads) as pctx:
                for k in ks:
                    samples = [parallel_tps(pctx, model, k, n) for _ in range(max(1, reps // 2))]
                    add(_row(f"tg{n}x{k}", "llamabind", samples, threads, name, n_seq=k))
    if overhead_model:
        with Model(overhead_model, n_gpu_layers=n_gpu_layers) as tiny, Context(tiny, n_ctx=1024, n_threads=1) as tctx:
            per_token_overhead(tctx, tiny, 64, 1)  # warm up
            ours, nat = per_token_overhead(tctx, tiny, 512, reps)
            diff = [1e6 * (a - b) for a, b in zip(ours, nat)]
            add(_row("overhead", "llamabind", [1 / x for x in ours], 1, Path(overhead_model).name,
                     us_per_token=statistics.median([1e6 * x for x in ours]),
                     overhead_us=statistics.median(diff), overhead_us_min=min(diff), overhead_us_max=max(diff)))
            add(_row("overhead", "native", [1 / x for x in nat], 1, Path(overhead_model).name,
                     us_per_token=statistics.median([1e6 * x for x in nat])))
    if embed_model:
        for row in embed_rows(embed_model, threads, reps, bench, n_gpu_layers=n_gpu_layers):
            add(row)
    for row in llama_cpp_python_rows(model_path, n, threads, reps, embed_model, n_gpu_layers):
        add(row)
    add(Row("load", "llamabind", 0.0, 0.0, 0.0, threads, name, [],
            {"load_s": round(load_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1), "ngl": n_gpu_layers}))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| model | impl | test | t | tok/s (median) | min | max | notes |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        notes = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
        lines.append(f"| {r.model} | {r.impl} | {r.test} | {r.n_threads} | {r.tps:.2f} | {r.tps_min:.2f} | "
                     f"{r.tps_max:.2f} | {notes} |")
    return "\n".join(lines)


def find_native(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get("LLAMABIND_TOOLS_DIR")
    if env and (Path(env) / "llama-bench").is_file():
        return str(Path(env) / "llama-bench")
    return shutil.which("llama-bench")


def machine_line() -> str:
    """A one-line description of this machine for reports."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def write_report(rows: list[Row], directory: str | Path, command: str) -> list[Path]:
    """Write report.md (the table, the machine, the command) and, with matplotlib, chart.png."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(f"# llamabind benchmark\n\nMachine: {machine_line()}  \nCommand: `{command}`\n\n"
                  f"{format_table(rows)}\n")
    written = [md]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    tests = [t for t in dict.fromkeys(r.test for r in rows) if t not in ("load", "overhead")]
    impls = list(dict.fromkeys(r.impl for r in rows if r.test in tests))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tests)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        vals = [next((r.tps for r in rows if r.test == t and r.impl == impl), 0.0) for t in tests]
        ax.bar([i + k * width for i in range(len(tests))], vals, width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(tests))], tests)
    ax.set_ylabel("tokens/s, texts/s for embed rows (median)")
    ax.set_title(f"{rows[0].model if rows else ''}: llamabind vs native")
    ax.legend()
    fig.tight_layout()
    png = out / "chart.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return written + [png]
