"""``python -m llamabind bench``: llamabind against native llama.cpp (and llama-cpp-python), side by side."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="llamabind vs native llama.cpp, side by side",
                       description="Prompt processing (pp) and generation (tg) speed of llamabind's decode loop "
                                   "against llama-bench from the same llama.cpp tree, alternating, the ratio "
                                   "taken per pair; optionally several sequences at once, the per-token "
                                   "overhead on a tiny model, and embedding throughput.")
    p.add_argument("-m", "--model", help="GGUF model (default: gemma3-270m from llamabind[model])")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for the pp test (default: 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tokens generated for the tg test (default: 128)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("-r", "--repetitions", type=int, default=5,
                   help="repetitions of each test, llamabind and native alternating (default: 5)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                   help="layers offloaded on both sides, ours and the native tools' (-1: all; default 0, the CPU)")
    p.add_argument("--native", help="llama-bench binary or its directory (default: $LLAMABIND_TOOLS_DIR)")
    p.add_argument("--parallel", default="", help="sequence counts, e.g. 1,2,4,8")
    p.add_argument("--overhead-model", help="tiny GGUF for the per-token overhead row")
    p.add_argument("--embed", metavar="MODEL", help="embedding GGUF for the texts/s rows (256 sentences)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--report", metavar="DIR", help="also write DIR/report.md and DIR/chart.png")
    p.set_defaults(fn=run, verbose=0)


def run(args) -> int:
    from .. import bench

    native = bench.find_native(args.native)
    if args.model is None:
        from ..models import default_model_path
        args.model = str(default_model_path(lambda msg: print(msg, file=sys.stderr)))
    parallel = [int(k) for k in args.parallel.split(",")] if args.parallel else []
    emit = (lambda r: print(r.as_json(), flush=True)) if args.json else (lambda r: None)
    rows = bench.run(args.model, p=args.n_prompt, n=args.n_gen, threads=args.threads, reps=args.repetitions,
                     native=native, parallel=parallel, overhead_model=args.overhead_model,
                     embed_model=args.embed, n_gpu_layers=args.n_gpu_layers, emit=emit)
    if not args.json:
        print(bench.format_table(rows))
    if args.report:
        for path in bench.write_report(rows, args.report, "python -m llamabind " + " ".join(sys.argv[1:])):
            print(f"wrote {path}", file=sys.stderr)
    return 0
