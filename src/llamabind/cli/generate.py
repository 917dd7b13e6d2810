"""``python -m llamabind generate``: text from a prompt; with ``--mmproj``, images and audio too.

Called by the ``generate`` command when ``--mmproj`` is given. The prompt is built as
llama-mtmd-cli builds it: when it holds no media marker, one marker per media file is put
in front of it (images first, then audio, in the order given); it is then rendered as one
user message with the model's chat template (used as is when the model has none).
"""

from __future__ import annotations

import os
import sys

from .common import make_sampler, model_args, open_model, print_events, progress_bar, sampling_args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Continue a prompt and stream the text to stdout (a summary line with "
                                   "token counts and speeds goes to stderr); with --mmproj, about images and audio.")
    model_args(p, default="gemma3-270m from llamabind[model]")
    sampling_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the text to continue (used as is, no chat template)")
    p.add_argument("--json", action="store_true", help="one JSON object per token, then a summary")
    p.add_argument("--mmproj", help="multimodal projector GGUF (enables --image/--audio)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable; needs --mmproj)")
    p.add_argument("--audio", action="append", default=[], help="audio file (repeatable; needs --mmproj)")
    p.set_defaults(fn=run)


def run(args) -> int:
    import llamabind as lb

    if args.mmproj:
        return run_generate_mm(args)
    model, ctx = open_model(args)
    with model, ctx:
        sampler = make_sampler(args, model)
        events = lb.generate(ctx, args.prompt, max_tokens=args.n_predict, sampler=sampler, stop=args.stop)
        print_events(events, args.json)
    return 0


def run_generate_mm(args) -> int:
    import llamabind as lb
    from llamabind import mtmd

    from ..models import default_model_path

    files = list(getattr(args, "image", None) or []) + list(getattr(args, "audio", None) or [])
    if not files:
        raise lb.InvalidInputError("--mmproj needs at least one --image or --audio file")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"media file not found: {f}")
    path = args.model or default_model_path(lambda msg: print(msg, file=sys.stderr))
    model = lb.Model(path, n_gpu_layers=args.n_gpu_layers, progress=progress_bar("loading"))
    with model:
        ctx = lb.Context(model, n_ctx=args.ctx_size, n_threads=args.threads)
        mctx = mtmd.MtmdContext(model, args.mmproj, use_gpu=args.n_gpu_layers != 0, n_threads=args.threads)
        bitmaps = [mtmd.Bitmap.from_file(mctx, f) for f in files]
        prompt = args.prompt
        if mctx.marker not in prompt:
            prompt = mctx.marker * len(bitmaps) + prompt
        if model.chat_template() is not None:
            # the same text a chat message with these media parts renders to
            prompt = model.apply_chat_template([{"role": "user", "content": prompt}], True)
            add_special = not ctx.vocab.starts_with_bos(prompt)
        else:
            add_special = True
        sampler = make_sampler(args, model)
        events = mtmd.generate(ctx, mctx, prompt, bitmaps, max_tokens=args.n_predict, sampler=sampler,
                               stop=args.stop, add_special=add_special, parse_special=True)
        for b in bitmaps:
            b.close()  # the chunks hold their own copy
        print_events(events, args.json, " (media included)")
    return 0
