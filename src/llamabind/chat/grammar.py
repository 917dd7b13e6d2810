"""Constrained output for chat: JSON schema to GBNF with llama.cpp's converter, and the sampler
a rendered prompt asks for (its grammar, lazily triggered where the template says so)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import InvalidInputError
from ..gbnf import SchemaLimits, check_json_schema
from ..raw import ffi, lib, take_text
from ..sampler import Sampler
from .types import ChatPrompt

if TYPE_CHECKING:
    from ..vocab import Vocab

_SPECIAL = re.compile(r"[.^$|()*+?\[\]{}\\]")  # what llama.cpp's regex_escape escapes


def json_schema_to_grammar(schema: Mapping[str, Any] | str, limits: SchemaLimits | None = None) -> str:
    """The GBNF grammar for a JSON schema (a mapping or JSON text), by llama.cpp's converter;
    InvalidInputError for a schema ``check_json_schema`` refuses (a ``$ref`` cycle, past ``limits``)."""
    try:
        text = json.dumps(check_json_schema(schema, limits))
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"the schema is not JSON: {e}") from None
    err = ffi.new("char[]", 1024)
    return take_text(lib.llamabind_json_schema_to_grammar(text.encode(), err, 1024), err,
                     "json schema to grammar", InvalidInputError)


def check_request_schemas(body: Mapping[str, Any], limits: SchemaLimits | None = None) -> None:
    """``check_json_schema`` on every schema a chat request holds: ``json_schema``, ``response_format``'s
    (``schema``, ``json_schema.schema``) and each tool's ``parameters``, as llama.cpp converts them."""
    rf = body.get("response_format")
    rf = rf if isinstance(rf, Mapping) else {}
    inner = rf.get("json_schema")
    found = [body.get("json_schema"), rf.get("schema"), inner.get("schema") if isinstance(inner, Mapping) else None]
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        found.append(fn.get("parameters") if isinstance(fn, Mapping) else None)
    for schema in found:
        if isinstance(schema, (Mapping, str)):
            check_json_schema(schema, limits)


def preserved_token_ids(vocab: "Vocab", prompt: ChatPrompt) -> frozenset[int]:
    """The template's preserved tokens that are single tokens: their text is kept in the output
    given to the parser (as llama-server renders them)."""
    ids = set()
    for text in prompt.preserved_tokens:
        toks = vocab.tokenize(text, add_special=False, parse_special=True)
        if toks.size == 1:
            ids.add(int(toks[0]))
    return frozenset(ids)


def chat_sampler(vocab: "Vocab", prompt: ChatPrompt, sampler: Sampler | None,
                 prefill: Sequence[int] = ()) -> Sampler | None:
    """``sampler`` behind the prompt's grammar, or None when the prompt has no grammar.

    The given sampler is cloned, not consumed (one holding Python samplers, which cannot be
    cloned, moves into the returned chain). Trigger words that are one preserved token
    become token triggers, as in llama-server. ``prefill``: tokens the grammar accepts first
    (the generation prompt, which a template's grammar starts with).
    """
    if not prompt.grammar:
        return None
    base = _own(sampler)
    if prompt.grammar_lazy:
        preserved = preserved_token_ids(vocab, prompt)
        patterns, tokens = [], []
        for t in prompt.grammar_triggers:
            if t.kind == "token":
                tokens.append(t.token)
            elif t.kind == "word":
                toks = vocab.tokenize(t.value, add_special=False, parse_special=True)
                if toks.size == 1 and int(toks[0]) in preserved:
                    tokens.append(int(toks[0]))
                else:
                    patterns.append(_SPECIAL.sub(r"\\\g<0>", t.value))
            elif t.kind == "pattern":
                patterns.append(t.value)
            else:  # pattern_full: anchored at both ends
                v = t.value
                patterns.append("^$" if not v else ("" if v.startswith("^") else "^") + v + ("" if v.endswith("$") else "$"))
        if not patterns and not tokens:
            raise InvalidInputError("the template's lazy grammar has no triggers")
        grammar = Sampler.grammar_lazy(vocab, prompt.grammar, trigger_patterns=patterns, trigger_tokens=tokens)
    else:
        grammar = Sampler.grammar(vocab, prompt.grammar)
        try:
            for tok in prefill:
                grammar.accept(tok)
        except InvalidInputError:
            grammar.close()
            base.close()
            raise InvalidInputError(
                f"the request's grammar starts with the generation prompt {prompt.generation_prompt!r}, which this "
                "vocabulary tokenizes into pieces the grammar rejects (as llama-server would)") from None
    return Sampler.chain(grammar, base)


def _own(sampler: Sampler | None) -> Sampler:
    if sampler is None:
        return Sampler.greedy()
    try:
        return sampler.clone()
    except InvalidInputError:  # Python samplers inside: the chain takes this one over
        return sampler
