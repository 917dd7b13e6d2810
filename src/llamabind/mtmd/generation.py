"""Multimodal chat rendering and generation: messages with image/audio parts, one call to generate."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..context import Context
from ..errors import (
    AbortedError,
    ContextOverflowError,
    InvalidInputError,
)
from ..generation import Cancel, DoneEvent, TokenEvent, finish, generate_after
from ..sampler import Sampler
from .bitmap import Bitmap
from .chunks import Chunks
from .context import MtmdContext
from .evaluation import _check_eval, _eval
from .types import Media

# -- chat -------------------------------------------------------------------------------------

_MEDIA_KEYS = {"image": ("image", "image_url"), "audio": ("audio", "input_audio")}


def _media_of(part: Mapping[str, Any], kind: str, where: str) -> Any:
    for key in _MEDIA_KEYS[kind]:
        if key in part:
            value = part[key]
            if isinstance(value, Mapping):  # {"url": ...} / {"data": ...} / {"path": ...}
                for sub in ("url", "path", "data"):
                    if sub in value:
                        value = value[sub]
                        break
            if isinstance(value, str) and value.startswith("file://"):
                value = value[len("file://"):]
            return value
    raise InvalidInputError(f"{where}: a {kind} part needs a {kind!r} key (a path, bytes, an array or a Bitmap)")


def render_chat(mctx: MtmdContext, messages: Sequence[Mapping[str, Any]], *, template: str | None = None,
                add_generation_prompt: bool = True) -> tuple[str, list[Media]]:
    """Render chat messages whose content may hold image/audio parts with the model's chat template.

    ``content`` is a str, or a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image", "image": MEDIA}``, ``{"type": "audio", "audio": MEDIA}`` where MEDIA is a
    path, encoded bytes, a numpy array or a Bitmap. Each media part becomes the media marker in
    the message text, in place. Returns the prompt and the media, in marker order.
    """
    flat: list[dict[str, str]] = []
    media: list[Media] = []
    marker = mctx.marker
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidInputError(f"message {i} needs 'role' and 'content'")
        content = m["content"]
        if isinstance(content, str):
            n = content.count(marker)
            if n:
                raise InvalidInputError(f"message {i}: text holds the media marker {marker!r}; "
                                        "give media as image/audio parts")
            text = content
        elif isinstance(content, Sequence):
            pieces = []
            for j, part in enumerate(content):
                where = f"message {i} part {j}"
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, Mapping) or "type" not in part:
                    raise InvalidInputError(f"{where}: a part is a dict with a 'type'")
                kind = part["type"]
                if kind == "text":
                    t = part.get("text")
                    if not isinstance(t, str):
                        raise InvalidInputError(f"{where}: a text part needs a str 'text'")
                    if marker in t:
                        raise InvalidInputError(f"{where}: text holds the media marker {marker!r}")
                    pieces.append(t)
                elif kind in ("image", "image_url"):
                    media.append(_media_of(part, "image", where))
                    pieces.append(marker)
                elif kind in ("audio", "input_audio"):
                    media.append(_media_of(part, "audio", where))
                    pieces.append(marker)
                else:
                    raise InvalidInputError(f"{where}: unknown part type {kind!r} (text, image, audio)")
            text = "".join(pieces)
        else:
            raise InvalidInputError(f"message {i}: content must be a str or a list of parts")
        flat.append({"role": m["role"], "content": text})
    prompt = mctx.model.apply_chat_template(flat, add_generation_prompt, template)
    return prompt, media


# -- generation -------------------------------------------------------------------------------

def _prepare(ctx: Context, mctx: MtmdContext, prompt: str | None, bitmaps: Sequence[Media],
             messages, template, add_special: bool, parse_special: bool) -> tuple[Chunks, str]:
    if mctx.model is not ctx.model:
        raise InvalidInputError("the MtmdContext and the Context belong to different models")
    if messages is not None:
        if prompt is not None or bitmaps:
            raise InvalidInputError("give a prompt (with bitmaps) or messages, not both")
        prompt, media = render_chat(mctx, messages, template=template)
        add_special = add_special and not ctx.vocab.starts_with_bos(prompt)
        parse_special = True
    elif prompt is None:
        raise InvalidInputError("a prompt or messages is required")
    else:
        media = list(bitmaps)
    made: list[Bitmap] = []  # made here from a path/bytes/array: closed once the chunks hold a copy
    try:
        loaded = []
        for m in media:
            b = Bitmap.load(mctx, m)
            if b is not m:
                made.append(b)
            loaded.append(b)
        chunks = mctx.tokenize(prompt, loaded, add_special=add_special, parse_special=parse_special)
    finally:
        for b in made:
            b.close()
    return chunks, prompt


def generate(ctx: Context, mctx: MtmdContext, prompt: str | None = None, bitmaps: Sequence[Media] = (), *,
             messages: Sequence[Mapping[str, Any]] | None = None, max_tokens: int = 256,
             sampler: Sampler | None = None, stop: Iterable[str] = (), seq_id: int = 0,
             cancel: Cancel | None = None, n_batch: int | None = None, template: str | None = None,
             add_special: bool = True, parse_special: bool = True) -> Iterator[TokenEvent | DoneEvent]:
    """Stream the continuation of a prompt with media: tokenize, evaluate, then the usual decode loop.

    ``prompt`` holds one media marker (``mctx.marker``) per entry of ``bitmaps`` (Bitmaps, paths,
    encoded bytes or numpy arrays); or ``messages`` are chat messages with image/audio parts
    (see ``render_chat``), rendered with the model's chat template. The sequence is cleared
    first. Events are those of ``llamabind.generate``; ``usage.prompt_tokens`` counts the
    media embeddings, and the timings include the media encoding. Input errors are raised
    here, before anything runs; the evaluation starts with the first ``next()``.
    """
    chunks, _ = _prepare(ctx, mctx, prompt, bitmaps, messages, template, add_special, parse_special)
    try:
        n_batch = ctx.n_batch if n_batch is None else int(n_batch)
        if chunks.n_tokens == 0:
            raise InvalidInputError("empty prompt: nothing to decode")
        if chunks.n_pos >= ctx.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt takes {chunks.n_pos} positions; the context holds {ctx.n_ctx_seq} per sequence "
                f"(leave room to generate: raise n_ctx or shorten the prompt)")
        if max_tokens < 1:
            raise InvalidInputError("max_tokens must be >= 1")
        _check_eval(ctx, chunks, 0, seq_id, n_batch)
    except BaseException:
        chunks.close()
        raise
    return _generate(ctx, chunks, seq_id=seq_id, n_batch=n_batch, max_tokens=max_tokens,
                     sampler=sampler, stop=stop, cancel=cancel)


def _generate(ctx: Context, chunks: Chunks, *, seq_id: int, n_batch: int, max_tokens: int,
              sampler: Sampler | None, stop: Iterable[str], cancel: Cancel | None) -> Iterator:
    n_prompt = chunks.n_tokens
    t_eval = 0.0

    def prefill() -> int:
        """Evaluate the chunks inside the generation's hold on the context."""
        nonlocal t_eval
        t0 = time.perf_counter()
        try:
            if cancel is not None and cancel.is_set():
                raise AbortedError("cancelled before the prompt was evaluated", 2)
            return _eval(ctx, chunks, 0, seq_id, n_batch, True, None)  # the loop installed ``cancel``
        finally:
            t_eval = time.perf_counter() - t0
            chunks.close()

    try:
        events = generate_after(ctx, prefill=prefill, n_prompt=n_prompt, seq_id=seq_id, max_tokens=max_tokens,
                                sampler=sampler, stop=stop, cancel=cancel)
    except BaseException:
        chunks.close()
        raise
    for ev in events:
        if isinstance(ev, DoneEvent):
            t = ev.timings
            # llama.cpp's prompt counters do not see the media encoder: rate the whole evaluation
            ev.timings = replace(t, prompt_tps=n_prompt / t_eval if t_eval > 0 else 0.0, prompt_ms=1e3 * t_eval)
        yield ev


def complete(ctx: Context, mctx: MtmdContext, prompt: str | None = None, bitmaps: Sequence[Media] = (),
             **kwargs) -> DoneEvent:
    """Run ``generate`` to the end and return its DoneEvent (``.text`` holds the whole text)."""
    return finish(generate(ctx, mctx, prompt, bitmaps, **kwargs))
