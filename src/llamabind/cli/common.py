"""What the subcommands share: model and sampling arguments, model loading, event printing, logging."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from typing import Any


def model_args(p: argparse.ArgumentParser, *, required: bool = False, what: str = "GGUF model",
               ctx_size: int | None = 4096, ctx_help: str = "context size in tokens (default: 4096)",
               default: str = "this command's default model: docs/cli.md") -> None:
    """-m/-t/-c/-ngl/-v, the same for every subcommand that loads a model; ``default`` names the
    model used without -m."""
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


# Sampling: what the user passes, else what the model recommends under llama.cpp's own GGUF keys
# (general.sampling.*, read as common_params_sampling reads a model's defaults), else these values.
# Without a recommended temperature the CLI is greedy: the default chat model (135M) rambles in
# French at llama.cpp's 0.8 and still misses one answer in 15 at 0.1 (30 seeds each), and a
# greedy run is repeatable. The other knobs act once a temperature is given.
SAMPLING = {  # option: (GGUF key, type, default)
    "temp": ("general.sampling.temp", float, 0.0),
    "top_k": ("general.sampling.top_k", int, 40),
    "top_p": ("general.sampling.top_p", float, 0.95),
    "min_p": ("general.sampling.min_p", float, 0.05),
    "repeat_penalty": ("general.sampling.penalty_repeat", float, 1.0),
    "repeat_last_n": ("general.sampling.penalty_last_n", int, 64),
}


def sampling_args(p: argparse.ArgumentParser) -> None:
    """-n, the sampling knobs (default: the model's recommendation, see SAMPLING), --grammar-file, --stop."""
    p.add_argument("-n", "--n-predict", type=int, default=256, help="maximum tokens to generate (default: 256)")
    knobs = {"temp": "temperature (0: greedy)", "top_k": "top-k, with a temperature (0: off)",
             "top_p": "top-p, with a temperature (1: off)", "min_p": "min-p, with a temperature (0: off)",
             "repeat_penalty": "repetition penalty (1: off)", "repeat_last_n": "tokens the repetition penalty looks back on"}
    for name, what in knobs.items():
        key, kind, default = SAMPLING[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{what} (default: the model's {key}, else {default:g})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--grammar-file", help="constrain output with a GBNF grammar file")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def model_sampling(model) -> dict[str, int | float]:
    """The sampling values ``model`` recommends in its GGUF metadata (llama.cpp's general.sampling.* keys)."""
    found: dict[str, int | float] = {}
    for name, (key, kind, _) in SAMPLING.items():
        raw = model.meta(key)
        if raw is None:
            continue
        try:
            found[name] = kind(float(raw)) if kind is int else kind(raw)
        except ValueError:
            continue  # llama.cpp ignores a value it cannot parse too
    return found


def sampling_values(args, model) -> dict[str, int | float]:
    """Each knob: the command line's value, else the model's recommendation, else SAMPLING's default."""
    recommended = model_sampling(model)
    return {name: getattr(args, name) if getattr(args, name) is not None else recommended.get(name, default)
            for name, (_, _, default) in SAMPLING.items()}


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


def make_sampler(args, model):
    """The sampler chain for ``args`` on ``model`` (see sampling_values), with --grammar-file."""
    import llamabind as lb

    grammar = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    v = sampling_values(args, model)
    return lb.Sampler.from_params(model.vocab, temperature=v["temp"], top_k=int(v["top_k"]), top_p=v["top_p"],
                                  min_p=v["min_p"], repeat_penalty=v["repeat_penalty"],
                                  repeat_last_n=int(v["repeat_last_n"]), seed=args.seed, grammar=grammar)


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


def system_of(args: Any) -> str | None:
    """--system, else (the default chat model: no -m) the system message ``chat`` and ``serve`` give it."""
    from ..models import CHAT_MODEL_SYSTEM

    return args.system if args.system is not None or args.model else CHAT_MODEL_SYSTEM
