"""What the subcommands share: model and sampling arguments, model loading, event printing, logging."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict


def model_args(p: argparse.ArgumentParser, *, required: bool = False, what: str = "GGUF model",
               ctx_size: int | None = 4096, ctx_help: str = "context size in tokens",
               default: str = "gemma3-270m from llamabind[model]") -> None:
    """-m/-t/-c/-ngl/-v, the same for every subcommand that loads a model."""
    p.add_argument("-m", "--model", required=required,
                   help=what + ("" if required else f" (default: {default})"))
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("-c", "--ctx-size", type=int, default=ctx_size, help=ctx_help)
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers to offload (-1: all)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="show llama.cpp's log (default: errors only; -vv: debug)")


def set_logging(verbose: int) -> None:
    """Errors only by default; -v: llama.cpp's info and warnings; -vv: debug."""
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("llamabind").setLevel(level)


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=256, help="maximum tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--grammar-file", help="constrain output with a GBNF grammar file")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def progress_bar(label: str):
    if not sys.stderr.isatty():
        return None
    def show(frac: float) -> bool:
        done = int(frac * 30)
        sys.stderr.write(f"\r{label} [{'#' * done}{' ' * (30 - done)}] {frac * 100:5.1f}%")
        if frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()
        return True
    return show


def model_path(args, chat: bool = False) -> str:
    """``-m``, else the default model: the chat model where the command chats."""
    from ..models import default_chat_model_path, default_model_path

    if args.model:
        return args.model
    if chat:
        return str(default_chat_model_path())
    return str(default_model_path(lambda msg: print(msg, file=sys.stderr)))


def open_model(args, chat: bool = False):
    """The model (``-m``, else the default: the chat model for ``chat``) and a context on it."""
    import llamabind as lb

    model = lb.Model(model_path(args, chat), n_gpu_layers=args.n_gpu_layers, progress=progress_bar("loading"))
    ctx = lb.Context(model, n_ctx=args.ctx_size, n_threads=args.threads)
    return model, ctx


def make_sampler(args, vocab):
    import llamabind as lb

    grammar = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    return lb.Sampler.from_params(vocab, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                                  min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                                  grammar=grammar)


def done_json(ev) -> dict:
    return {"finish_reason": ev.finish_reason, "usage": asdict(ev.usage), "timings": asdict(ev.timings)}


def print_events(events, as_json: bool, prompt_note: str = "") -> None:
    """Stream generation events to stdout: text, or one JSON object per token then a summary."""
    import llamabind as lb

    for ev in events:
        if isinstance(ev, lb.TokenEvent):
            if as_json:
                print(json.dumps({"id": ev.token, "text": ev.text}, ensure_ascii=False), flush=True)
            else:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        elif as_json:
            print(json.dumps(done_json(ev)), flush=True)
        else:
            print(flush=True)
            t = ev.timings
            print(f"[{ev.finish_reason}: {ev.usage.prompt_tokens} prompt{prompt_note}, "
                  f"{ev.usage.completion_tokens} generated; prompt {t.prompt_tps:.1f} tok/s, "
                  f"generation {t.generation_tps:.1f} tok/s]", file=sys.stderr)
