"""The calls a runtime makes: ``generate`` streams one prompt (text, tokens or chat messages),
``generate_many`` several in one batch per step, ``generate_after`` continues input decoded by
other means (media chunks), ``complete`` runs any of them to the end."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from ..context import Context
from ..errors import ContextOverflowError, InvalidInputError, LlamaError
from ..sampler import Sampler
from ..vocab import as_tokens
from .budget import ReasoningBudget
from .chatprep import generation_prompt_tokens, prepare_chat
from .events import Cancel, DoneEvent, TokenEvent
from .loop import SeqState, run
from .truncate import kept_prefix, truncate_left

Prompt = Union[str, Sequence[int], np.ndarray]
Messages = Sequence[Mapping[str, Any]]


def render_prompt(ctx: Context, prompt: Prompt | None = None, messages: Messages | None = None,
                  template: str | None = None, add_special: bool = True,
                  parse_special: bool = True, *, chat: Mapping[str, Any] | None = None) -> np.ndarray:
    """Tokens for a text prompt, a token list, or chat messages rendered with the chat template
    (the model's Jinja template, as ``generate`` renders them, with ``chat`` options such as
    ``enable_thinking`` or ``tools``)."""
    vocab = ctx.vocab
    if messages is not None:
        if prompt is not None:
            raise InvalidInputError("give a prompt or messages, not both")
        tokens = prepare_chat(ctx, messages, template, chat or {}, None, [], add_special).tokens
    elif isinstance(prompt, (str, bytes)):
        tokens = vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
    elif prompt is None:
        raise InvalidInputError("a prompt or messages is required")
    else:
        tokens = as_tokens(prompt)
        vocab.check_tokens(tokens)
    if tokens.size == 0:
        raise InvalidInputError("empty prompt: nothing to decode")
    return tokens


def _check_ctx(ctx: Context, max_tokens: int | Sequence[int]) -> None:
    """What every generation needs of its context before anything runs."""
    if not ctx.causal_attn or not ctx.model.has_decoder:
        raise InvalidInputError("generation needs a decoder with causal attention (set_causal_attn(True))")
    for m in ([max_tokens] if isinstance(max_tokens, int) else list(max_tokens)):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise InvalidInputError(f"max_tokens must be an int >= 1, not {m!r}")


def _check_fit(ctx: Context, tokens: np.ndarray, index: int = 0) -> None:
    if tokens.size >= ctx.n_ctx_seq:
        raise ContextOverflowError(
            f"prompt {index} has {tokens.size} tokens; the context holds {ctx.n_ctx_seq} per sequence "
            f"(leave room to generate: raise n_ctx or shorten the prompt)")


def generate(ctx: Context, prompt: Prompt | None = None, *, messages: Messages | None = None,
             max_tokens: int = 256, sampler: Sampler | None = None, stop: Iterable[str] = (),
             seq_id: int = 0, cancel: Cancel | None = None, reuse_cache: bool = True,
             template: str | None = None, add_special: bool = True, parse_special: bool = True,
             ignore_eog: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] | None = None, parallel_tool_calls: bool | None = None,
             response_format: Mapping[str, Any] | None = None, json_schema: Mapping[str, Any] | None = None,
             enable_thinking: bool | None = None, reasoning_format: str | None = None,
             reasoning_effort: str | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
             continue_final_message: bool | None = None, add_generation_prompt: bool | None = None,
             now: int | None = None, reasoning_budget: int | None = None, truncate: str | None = None,
             on_token: Callable[[TokenEvent], object] | None = None) -> Iterator[TokenEvent | DoneEvent]:
    """Stream the continuation of ``prompt`` (text or tokens) or chat ``messages``.

    Only the part of the prompt after the longest prefix already in the sequence's KV cache
    is decoded (``usage.cached_tokens``). A prompt that does not fit raises
    ContextOverflowError before anything is decoded. Greedy when ``sampler`` is None.
    ``ignore_eog`` keeps going past end-of-generation tokens (benchmarks).

    Chat ``messages`` are OpenAI-shaped and rendered by the model's Jinja template (or
    ``template``) as llama-server renders them; the other chat arguments mean what they mean
    in an OpenAI request. The output is parsed as it streams: ``TokenEvent.deltas`` and
    ``DoneEvent.message`` (content, reasoning_content, tool_calls). ``reasoning_budget``: after
    that many thinking tokens the template's end-of-thinking tag is forced (as llama-server's
    ``reasoning_budget_tokens``; nothing to do for a template without thinking tags).

    ``truncate="left"``: a prompt that leaves less than ``max_tokens`` (at most half the
    context) of room loses its oldest tokens after the BOS token or the system messages
    (``usage.truncated_tokens``) instead of raising ContextOverflowError. ``on_token`` is called
    with each TokenEvent before it is yielded: an exception it raises ends the generation as a
    failing sampler does (a DoneEvent with the text so far, then the exception).
    """
    _check_ctx(ctx, max_tokens)
    if reasoning_budget is not None and (isinstance(reasoning_budget, bool) or not isinstance(reasoning_budget, int)
                                         or reasoning_budget < 0):
        raise InvalidInputError(f"reasoning_budget must be an int >= 0 or None, not {reasoning_budget!r}")
    ctx.check_seq(seq_id)
    chat = {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls,
            "response_format": response_format, "json_schema": json_schema, "enable_thinking": enable_thinking,
            "reasoning_format": reasoning_format, "reasoning_effort": reasoning_effort,
            "chat_template_kwargs": chat_template_kwargs, "continue_final_message": continue_final_message,
            "add_generation_prompt": add_generation_prompt, "now": now}
    setup = None
    if messages is not None:
        if prompt is not None:
            raise InvalidInputError("give a prompt or messages, not both")
        stop = [stop] if isinstance(stop, str) else list(stop)
        setup = prepare_chat(ctx, messages, template, chat, sampler, stop, add_special)
        tokens = setup.tokens
        if tokens.size == 0:
            raise InvalidInputError("empty prompt: nothing to decode")
    else:
        if any(v is not None for v in chat.values()) or reasoning_budget is not None:
            raise InvalidInputError("chat arguments (tools, response_format, reasoning_budget, ...) need messages=")
        tokens = render_prompt(ctx, prompt, None, template, add_special, parse_special)
    n_cut = 0
    if truncate is not None:
        keep = kept_prefix(ctx, tokens, setup.text if setup else None, messages, add_special)
        tokens, n_cut = truncate_left(ctx, tokens, truncate, max_tokens, keep)
    _check_fit(ctx, tokens)
    if setup is None:
        seq = SeqState(ctx, 0, seq_id, tokens, sampler or Sampler.greedy(), stop, max_tokens)
    else:
        seq = SeqState(ctx, 0, seq_id, tokens, setup.sampler or sampler or Sampler.greedy(), setup.stop,
                       max_tokens, render=setup.render)
        seq.parser = setup.parser()
        if reasoning_budget is not None and setup.prompt is not None:
            seq.budget = ReasoningBudget.for_prompt(ctx.vocab, setup.prompt, reasoning_budget,
                                                    generation_prompt_tokens(ctx, setup.prompt))
    seq.ignore_eog = ignore_eog
    seq.n_truncated = n_cut
    if on_token is not None and not callable(on_token):
        raise InvalidInputError(f"on_token must be callable, not {type(on_token).__name__}")
    return run(ctx, [seq], reuse_cache=reuse_cache, cancel=cancel, on_token=on_token)


def generate_many(ctx: Context, prompts: Sequence[Prompt], *, max_tokens: int | Sequence[int] = 256,
                  samplers: Sequence[Sampler] | Callable[[int], Sampler] | None = None,
                  stop: Iterable[str] | Sequence[Iterable[str]] = (), cancel: Cancel | None = None,
                  add_special: bool = True, parse_special: bool = True,
                  ignore_eog: bool = False) -> Iterator[TokenEvent | DoneEvent]:
    """Generate for several prompts at once, sequence ids 0..N-1, one batch per step.

    Each prompt has its own sampler (a list, or a factory called with the index; greedy by
    default), stop strings and token limit; events carry the prompt's ``index``.
    """
    _check_ctx(ctx, max_tokens)
    if not prompts:
        raise InvalidInputError("no prompts")
    n = len(prompts)
    if n > ctx.n_seq_max or n > ctx.n_batch:
        raise InvalidInputError(f"{n} prompts but the context has n_seq_max={ctx.n_seq_max}, n_batch={ctx.n_batch}")
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    if isinstance(stop, str):
        stop = [stop]
    stops: list[Iterable[str]] = (list(stop) if stop and not isinstance(next(iter(stop)), str)
                                  else [list(stop)] * n)  # type: ignore[list-item, arg-type]
    if len(limits) != n or len(stops) != n:
        raise InvalidInputError("max_tokens and stop must give one value per prompt")
    if samplers is None:
        smpls = [Sampler.greedy() for _ in range(n)]
    elif callable(samplers):
        smpls = [samplers(i) for i in range(n)]
    else:
        smpls = list(samplers)
        if len(smpls) != n or len({id(s) for s in smpls}) != n:
            raise InvalidInputError("give one distinct sampler per prompt")
    seqs = []
    for i, p in enumerate(prompts):
        toks = render_prompt(ctx, p, None, None, add_special, parse_special)
        _check_fit(ctx, toks, i)
        seqs.append(SeqState(ctx, i, i, toks, smpls[i], stops[i], limits[i]))
        seqs[-1].ignore_eog = ignore_eog
    return run(ctx, seqs, reuse_cache=False, cancel=cancel)


def generate_after(ctx: Context, n_past: int | None = None, *, prefill: Callable[[], int] | None = None,
                   n_prompt: int | None = None, seq_id: int = 0, max_tokens: int = 256,
                   sampler: Sampler | None = None, stop: Iterable[str] = (),
                   cancel: Cancel | None = None) -> Iterator[TokenEvent | DoneEvent]:
    """Continue a sequence whose input was decoded by other means (e.g. libmtmd chunks).

    Either ``n_past``: the positions already in the sequence, whose last decode produced
    logits for the last one; or ``prefill``: a callable that decodes the input and returns
    ``n_past``, run inside the generation (the context is held, ``cancel`` applies, and
    ``timings.ttft_s`` counts it). ``n_prompt`` (default ``n_past``) is reported as
    ``usage.prompt_tokens``. The sequence is not reused as a text prefix afterwards.
    """
    _check_ctx(ctx, max_tokens)
    ctx.check_seq(seq_id)
    if (n_past is None) == (prefill is None):
        raise InvalidInputError("give n_past or prefill")
    if n_past is not None and not 0 < n_past < ctx.n_ctx_seq:
        raise ContextOverflowError(f"n_past={n_past} must be in (0, {ctx.n_ctx_seq})")
    past = n_past
    if max_tokens < 1:
        raise InvalidInputError("max_tokens must be >= 1")
    seq = SeqState(ctx, 0, seq_id, np.empty(0, np.int32), sampler or Sampler.greedy(), stop, max_tokens)
    seq.row = -1
    seq.prefill = prefill if prefill is not None else (lambda: int(past or 0))
    seq.n_prompt = -1 if n_prompt is None else n_prompt  # -1: report n_past
    return run(ctx, [seq], reuse_cache=False, cancel=cancel)


def finish(events: Iterable[TokenEvent | DoneEvent]) -> DoneEvent:
    """Run a generation's events to the end and return its (last) DoneEvent."""
    done = None
    for ev in events:
        if isinstance(ev, DoneEvent):
            done = ev
    if done is None:
        raise LlamaError("generation ended without a result")
    return done


def complete(ctx: Context, prompt: Prompt | None = None, **kwargs) -> DoneEvent:
    """Run ``generate`` to the end and return its DoneEvent (``.text`` holds the whole text)."""
    return finish(generate(ctx, prompt, **kwargs))
