"""Command line: ``python -m llamabind {info,generate,chat} ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF model (default: gemma3-270m from llamabind[model])")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers to offload (-1: all)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="show llama.cpp's log (default: errors only; -vv: debug)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=256, help="maximum tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--grammar-file", help="constrain output with a GBNF grammar file")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _progress_bar(label: str):
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


def _open(args):
    import llamabind as lb
    from .models import default_model_path

    path = args.model or default_model_path(lambda msg: print(msg, file=sys.stderr))
    model = lb.Model(path, n_gpu_layers=args.n_gpu_layers, progress=_progress_bar("loading"))
    ctx = lb.Context(model, n_ctx=args.ctx_size, n_threads=args.threads)
    return model, ctx


def _sampler(args, vocab):
    import llamabind as lb

    grammar = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    return lb.Sampler.from_params(vocab, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                                  min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                                  grammar=grammar)


def _done_json(ev) -> dict:
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
            print(json.dumps(_done_json(ev)), flush=True)
        else:
            print(flush=True)
            t = ev.timings
            print(f"[{ev.finish_reason}: {ev.usage.prompt_tokens} prompt{prompt_note}, "
                  f"{ev.usage.completion_tokens} generated; prompt {t.prompt_tps:.1f} tok/s, "
                  f"generation {t.generation_tps:.1f} tok/s]", file=sys.stderr)


def cmd_info(args) -> int:
    import llamabind as lb

    info = lb.system_info()
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0
    print(f"llamabind {info.version}")
    print(f"llama.cpp build {info.llama_cpp_build} ({info.llama_cpp_source}, sha256 {info.llama_cpp_sha256[:12]}...)")
    print(f"accelerator: {info.accelerator} (native={info.native}, backend_dl={info.backend_dl}, {info.compiler})")
    print(f"backends: {', '.join(info.backends)}")
    for d in info.devices:
        print(f"device {d.name} [{d.type}, {d.backend}]: {d.description}; "
              f"{d.memory_free / 2**20:.0f}/{d.memory_total / 2**20:.0f} MiB free")
    print(f"system: {info.system_info}")
    return 0


def cmd_generate(args) -> int:
    import llamabind as lb

    if args.mmproj:
        from ._cli_mtmd import run_generate_mm

        return run_generate_mm(args)
    model, ctx = _open(args)
    with model, ctx:
        sampler = _sampler(args, model.vocab)
        events = lb.generate(ctx, args.prompt, max_tokens=args.n_predict, sampler=sampler, stop=args.stop)
        print_events(events, args.json)
    return 0


def cmd_chat(args) -> int:
    import llamabind as lb

    model, ctx = _open(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with model, ctx:
        sampler = _sampler(args, model.vocab)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = None
            for ev in lb.generate(ctx, messages=messages, max_tokens=args.n_predict, sampler=sampler,
                                  stop=args.stop):
                if isinstance(ev, lb.TokenEvent):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                else:
                    reply = ev
            sys.stdout.write("\n")
            if args.verbose and reply is not None:
                print(f"[{reply.usage.cached_tokens}/{reply.usage.prompt_tokens} prompt tokens from cache]",
                      file=sys.stderr)
            messages.append({"role": "assistant", "content": reply.text if reply else ""})
    return 0


def cmd_bench(args) -> int:
    from . import bench

    native = bench.find_native(args.native)
    if args.model is None:
        from .models import default_model_path
        args.model = str(default_model_path(lambda msg: print(msg, file=sys.stderr)))
    parallel = [int(k) for k in args.parallel.split(",")] if args.parallel else []
    emit = (lambda r: print(r.as_json(), flush=True)) if args.json else (lambda r: None)
    rows = bench.run(args.model, p=args.n_prompt, n=args.n_gen, threads=args.threads, reps=args.repetitions,
                     native=native, parallel=parallel, overhead_model=args.overhead_model,
                     embed_model=args.embed, emit=emit)
    if not args.json:
        print(bench.format_table(rows))
    if args.report:
        for path in bench.write_report(rows, args.report, "python -m llamabind " + " ".join(sys.argv[1:])):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llamabind", description="llamabind command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="version, llama.cpp build, accelerator, devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info, verbose=0)
    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--json", action="store_true", help="one JSON object per token, then a summary")
    p.add_argument("--mmproj", help="multimodal projector GGUF (enables --image/--audio)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable; needs --mmproj)")
    p.add_argument("--audio", action="append", default=[], help="audio file (repeatable; needs --mmproj)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat with the model's template and KV reuse")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default="", help="system message")
    p.set_defaults(fn=cmd_chat)
    from ._cli_embed import add_parser as add_embed_parser

    add_embed_parser(sub)
    p = sub.add_parser("bench", help="llamabind vs native llama.cpp, side by side")
    p.add_argument("-m", "--model", help="GGUF model (default: gemma3-270m from llamabind[model])")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--native", help="llama-bench binary or its directory (default: $LLAMABIND_TOOLS_DIR)")
    p.add_argument("--parallel", default="", help="sequence counts, e.g. 1,2,4,8")
    p.add_argument("--overhead-model", help="tiny GGUF for the per-token overhead row")
    p.add_argument("--embed", metavar="MODEL", help="embedding GGUF for the texts/s rows (256 sentences)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--report", metavar="DIR", help="also write DIR/report.md and DIR/chart.png")
    p.set_defaults(fn=cmd_bench, verbose=0)
    args = ap.parse_args(argv)
    level = {0: logging.ERROR, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("llamabind").setLevel(level)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        import llamabind as lb

        if isinstance(e, lb.LlamaError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
