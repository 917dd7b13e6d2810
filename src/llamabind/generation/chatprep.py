"""What a chat generation needs before the decode loop runs: the prompt rendered by the model's
Jinja template (llama.cpp's engine, as llama-server renders it), the grammar sampler the request
asks for, the template's extra stops, the tokens to show as text, and the output parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..chat import ChatParser, ChatPrompt, ChatTemplates, chat_sampler, json_schema_to_grammar, preserved_token_ids
from ..chat.grammar import _own
from ..context import Context
from ..errors import InvalidInputError
from ..model import builtin_chat_templates
from ..sampler import Sampler

# The chat keyword arguments of generate(), as ChatTemplates.apply takes them.
CHAT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "json_schema", "enable_thinking",
                "reasoning_format", "reasoning_effort", "chat_template_kwargs", "continue_final_message",
                "add_generation_prompt", "now")
_JINJA_ONLY = tuple(k for k in CHAT_OPTIONS if k not in ("response_format", "json_schema", "add_generation_prompt"))


@dataclass(slots=True)
class ChatSetup:
    tokens: np.ndarray
    prompt: ChatPrompt | None     # None: rendered by llama_chat_apply_template, no parser
    sampler: Sampler | None       # the request's grammar in front of the caller's sampler
    stop: list[str]
    render: frozenset[int]        # special tokens the parser needs to see as text
    text: str = ""                # the rendered prompt

    def parser(self) -> ChatParser | None:
        return ChatParser(self.prompt) if self.prompt is not None else None


def uses_jinja(ctx: Context, template: str | None) -> bool:
    """Whether messages go through the Jinja engine: always, except for a model without any
    template in its GGUF (llama.cpp's built-in one for its architecture) or a built-in name."""
    model = ctx.model
    if template is None:
        return model.chat_template() is not None or model.chat_template("tool_use") is not None
    return not (isinstance(template, str) and "{" not in template and template in builtin_chat_templates())


def prepare_chat(ctx: Context, messages: Sequence[Mapping[str, Any]], template: str | None,
                 options: Mapping[str, Any], sampler: Sampler | None, stop: Sequence[str],
                 add_special: bool) -> ChatSetup:
    vocab = ctx.vocab
    opts = {k: v for k, v in options.items() if v is not None}
    if not uses_jinja(ctx, template):
        jinja = [k for k in _JINJA_ONLY if k in opts]
        if jinja:
            raise InvalidInputError(f"{', '.join(jinja)} need a Jinja chat template, and the model has none: "
                                    "pass template= (Jinja text, a .jinja file)")
        text = ctx.model.apply_chat_template(messages, opts.get("add_generation_prompt", True), template)
        tokens = vocab.tokenize(text, add_special=add_special and not vocab.starts_with_bos(text), parse_special=True)
        schema = _schema(opts)
        smpl = None
        if schema is not None:
            smpl = Sampler.chain(Sampler.grammar(vocab, json_schema_to_grammar(schema)), _own(sampler))
        return ChatSetup(tokens, None, smpl, list(stop), frozenset(), text)
    prompt = ChatTemplates.for_model(ctx.model, template).apply(messages, **opts)
    text = prompt.prompt
    tokens = vocab.tokenize(text, add_special=add_special and not vocab.starts_with_bos(text), parse_special=True)
    prefill = generation_prompt_tokens(ctx, prompt) if prompt.grammar and not prompt.grammar_lazy else []
    smpl = chat_sampler(vocab, prompt, sampler, prefill)
    return ChatSetup(tokens, prompt, smpl, list(stop) + list(prompt.stop), preserved_token_ids(vocab, prompt), text)


def _schema(opts: Mapping[str, Any]) -> Any:
    """The JSON schema a request's response_format or json_schema asks for (as llama-server reads them)."""
    schema = opts.get("json_schema")
    rf = opts.get("response_format")
    if isinstance(rf, Mapping):
        kind = rf.get("type")
        if kind == "json_object":
            schema = rf.get("schema", schema if schema is not None else {})
        elif kind == "json_schema":
            inner = rf.get("json_schema") or {}
            if not isinstance(inner, Mapping):
                raise InvalidInputError("response_format's json_schema must be a mapping with a 'schema'")
            schema = inner.get("schema", {})
        elif kind not in (None, "text"):
            raise InvalidInputError(f"response_format type must be text, json_object or json_schema, not {kind!r}")
    elif rf is not None:
        raise InvalidInputError("response_format must be a mapping")
    if isinstance(schema, Mapping) and not schema:
        schema = {"type": "object"}  # an empty schema means any object
    return schema


def generation_prompt_tokens(ctx: Context, prompt: ChatPrompt) -> list[int]:
    """The generation prompt's tokens, which the template's grammar starts with (llama.cpp's
    sampler prefills them; a leading space some tokenizers add before a special token is skipped)."""
    if not prompt.generation_prompt:
        return []
    vocab = ctx.vocab
    toks = [int(t) for t in vocab.tokenize(prompt.generation_prompt, add_special=False, parse_special=True)]
    if toks and vocab.token_to_piece(toks[0], True)[:1].isspace() and not prompt.generation_prompt[:1].isspace():
        toks = toks[1:]
    return toks
