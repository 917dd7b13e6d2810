"""``python -m llamabind generate --mmproj MMPROJ --image FILE [--audio FILE] -p PROMPT``.

Called by the ``generate`` command when ``--mmproj`` is given. The prompt is built as
llama-mtmd-cli builds it: when it holds no media marker, one marker per media file is put
in front of it (images first, then audio, in the order given); it is then rendered as one
user message with the model's chat template (used as is when the model has none).
"""

from __future__ import annotations

import os
import sys


def run_generate_mm(args) -> int:
    import llamabind as lb
    from llamabind import mtmd

    from .__main__ import _progress_bar, _sampler, print_events
    from .models import default_model_path

    files = list(getattr(args, "image", None) or []) + list(getattr(args, "audio", None) or [])
    if not files:
        raise lb.InvalidInputError("--mmproj needs at least one --image or --audio file")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"media file not found: {f}")
    path = args.model or default_model_path(lambda msg: print(msg, file=sys.stderr))
    model = lb.Model(path, n_gpu_layers=args.n_gpu_layers, progress=_progress_bar("loading"))
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
        sampler = _sampler(args, model.vocab)
        events = mtmd.generate(ctx, mctx, prompt, bitmaps, max_tokens=args.n_predict, sampler=sampler,
                               stop=args.stop, add_special=add_special, parse_special=True)
        for b in bitmaps:
            b.close()  # the chunks hold their own copy
        print_events(events, args.json, " (media included)")
    return 0
