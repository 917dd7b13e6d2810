"""OpenAI request bodies, checked and turned into engine requests (``llamabind.engine.Request``
fields), with llama-server's extensions; anything wrong is an ``APIError`` naming the parameter."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..chat.grammar import check_request_schemas
from ..errors import InvalidInputError
from ..gbnf import GrammarLimits, SchemaLimits, check_grammar

# llama-server's sampling defaults (the engine's own default is greedy)
DEFAULT_TEMPERATURE = 0.8
INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask of an exposed server. ``max_body_bytes`` and ``max_json_depth``
    bound the body before it is parsed (413 / 400); ``max_prompt_tokens`` (None: the context's
    size) the rendered prompt; ``default_max_tokens`` caps a request that names no
    ``max_tokens``; ``grammar`` bounds every GBNF grammar a client sends, ``schema`` every JSON
    schema (response formats and tool parameters). A client whose grammar ran out of llama.cpp's
    work budget (``LLAMA_GRAMMAR_MAX_WORK``) gets 429 for its grammars for ``grammar_penalty_s``
    (0: never): each such grammar costs the engine's thread up to a budget of work, once."""

    max_body_bytes: int = 4 << 20
    max_json_depth: int = 128
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 4096
    grammar: GrammarLimits = field(default_factory=lambda: GrammarLimits(max_bytes=128 << 10, max_rules=2000,
                                                                         max_alternations=20_000))
    schema: SchemaLimits = field(default_factory=SchemaLimits)
    grammar_penalty_s: float = 60.0


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes, max_depth: int) -> Any:
    """A request body as JSON, or a 400: not UTF-8 JSON, ``NaN``/``Infinity`` (Python's parser takes
    them, JSON has none), a lone surrogate escape (no UTF-8 text holds one), nesting past ``max_depth``."""
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    todo: list[tuple[Any, int]] = [(body, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise APIError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), not text")
        elif isinstance(v, (dict, list)):
            if depth > max_depth:
                raise APIError(400, f"the request body nests deeper than {max_depth} levels")
            todo.extend((x, depth + 1) for x in (v if isinstance(v, list) else (*v.keys(), *v.values())))
    return body


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class Call:
    """One parsed request: the engine options and how to answer."""

    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int = -1  # -1: no logprobs asked for


def _get(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise bad(name, f"'{name}' must be {what}, not a boolean")
    if not isinstance(v, kinds):
        raise bad(name, f"'{name}' must be {what}, not {type(v).__name__}")
    return v


def _number(body: Mapping[str, Any], name: str, lo: float | None = None, hi: float | None = None,
            integer: bool = False) -> Any:
    v = _get(body, name, int if integer else (int, float), "an integer" if integer else "a number")
    if v is not None and not integer and isinstance(v, int):
        try:
            v = float(v)
        except OverflowError:  # JSON integers have no bound; floats do
            raise bad(name, f"'{name}' is too large") from None
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        span = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise bad(name, f"'{name}' must be {span}, not {v}")
    return v


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "'stop' must be a string or a list of non-empty strings")
    return stop


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float] | None:
    lb = _get(body, "logit_bias", dict, "an object of token ids to biases")
    if not lb:
        return None
    out: dict[int, float] = {}
    for k, v in lb.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"'logit_bias' keys must be token ids, not {k!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], not {v!r}")
        out[tok] = float(v)
    return out


def _common(body: Mapping[str, Any], n_ctx_seq: int, limits: Limits) -> Call:
    """What chat and text completions share: length, sampling, stops, streaming."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    n = _number(body, "n", 1, integer=True)
    if n not in (None, 1):
        raise bad("n", "only n=1 is supported")
    opts: dict[str, Any] = {}
    limit = None
    for name in ("max_completion_tokens", "max_tokens", "n_predict"):
        v = _number(body, name, hi=None if name == "n_predict" else 2 ** 63 - 1, integer=True)
        if v is not None and not (name == "n_predict" and v < 0):
            if v < 1:
                raise bad(name, f"'{name}' must be >= 1, not {v}")
            limit = v if limit is None else limit
    opts["max_tokens"] = limit if limit is not None else min(n_ctx_seq, limits.default_max_tokens)
    t = _number(body, "temperature", 0)
    opts["temperature"] = DEFAULT_TEMPERATURE if t is None else float(t)
    for name, lo, hi, integer in (("top_p", 0, 1, False), ("min_p", 0, 1, False), ("top_k", 0, INT32_MAX, True),
                                  ("frequency_penalty", -2, 2, False), ("presence_penalty", -2, 2, False),
                                  ("repeat_penalty", 0, None, False), ("seed", None, None, True)):
        v = _number(body, name, lo, hi, integer)
        if v is not None:
            opts[name] = v if integer else float(v)
    if opts.get("seed") is not None and not 0 <= opts["seed"] < 2 ** 32:
        opts["seed"] %= 2 ** 32  # OpenAI takes any integer; llama.cpp's seed is 32 bits
    opts["stop"] = _stop(body)
    bias = _logit_bias(body)
    if bias:
        opts["logit_bias"] = bias
    grammar = _get(body, "grammar", str, "a GBNF grammar")
    if grammar:
        try:
            check_grammar(grammar, limits.grammar)
        except InvalidInputError as e:
            raise bad("grammar", str(e)) from None
        opts["grammar"] = grammar
    if _get(body, "ignore_eos", bool, "a boolean"):
        opts["ignore_eog"] = True
    stream = bool(_get(body, "stream", bool, "a boolean"))
    so = _get(body, "stream_options", dict, "an object")
    if so is not None and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with stream: true")
    usage = bool(_get(so or {}, "include_usage", bool, "a boolean"))
    return Call(opts, stream, usage)


def chat_call(body: Mapping[str, Any], n_ctx_seq: int, limits: Limits, system: str | None = None) -> Call:
    """A ``/v1/chat/completions`` body as an engine request; ``system`` goes in front of messages
    that bring no system (or developer) message of their own."""
    call = _common(body, n_ctx_seq, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a 'role'")
    opts = call.options
    if system and not any(m["role"] in ("system", "developer") for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    opts["messages"] = messages
    if _get(body, "logprobs", bool, "a boolean"):
        opts["logprobs"] = True
        call.top_logprobs = _number(body, "top_logprobs", 0, 20, integer=True) or 0
        opts["top_logprobs"] = call.top_logprobs
    elif body.get("top_logprobs"):
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    tools = _get(body, "tools", list, "a list of tools")
    if tools:
        opts["tools"] = tools
    for name, kinds, what in (("tool_choice", (str, dict), "a string or an object"),
                              ("parallel_tool_calls", bool, "a boolean"),
                              ("response_format", dict, "an object"), ("json_schema", dict, "an object"),
                              ("reasoning_format", str, "a string"), ("reasoning_effort", str, "a string"),
                              ("enable_thinking", bool, "a boolean"), ("chat_template_kwargs", dict, "an object"),
                              ("add_generation_prompt", bool, "a boolean"),
                              ("continue_final_message", bool, "a boolean")):
        v = _get(body, name, kinds, what)
        if v is not None:
            opts[name] = v
    rf = opts.get("response_format")
    if rf is not None and rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", "'response_format.type' must be text, json_object or json_schema")
    if rf is not None and rf.get("type") == "json_schema":
        inner = rf.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict):
            raise bad("response_format", "'response_format.json_schema' must be an object with a 'schema' object")
    try:
        check_request_schemas(opts, limits.schema)
    except InvalidInputError as e:
        raise bad("response_format" if rf is not None else "tools" if tools else "json_schema", str(e)) from None
    return call


def completion_call(body: Mapping[str, Any], n_ctx_seq: int, limits: Limits) -> Call:
    """A ``/v1/completions`` body as an engine request: one prompt, text or token ids."""
    call = _common(body, n_ctx_seq, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad("prompt", "'prompt' must be a string, a list of token ids, or a list of one of those")
    elif not isinstance(prompt, str):
        raise bad("prompt", "'prompt' must be a string or a list of token ids")
    call.options["prompt"] = prompt
    lp = _number(body, "logprobs", 0, 20, integer=True)
    if lp is not None:
        call.options.update(logprobs=True, top_logprobs=lp)
        call.top_logprobs = lp
    if _get(body, "echo", bool, "a boolean"):
        raise bad("echo", "'echo' is not supported")
    if body.get("suffix"):
        raise bad("suffix", "'suffix' is not supported")
    if _number(body, "best_of", 1, integer=True) not in (None, 1):
        raise bad("best_of", "only best_of=1 is supported")
    return call


def embedding_input(body: Mapping[str, Any]) -> tuple[list[str], int | None, bool]:
    """A ``/v1/embeddings`` body: the texts, the ``dimensions`` asked for, and whether the
    vectors go as base64 (of little-endian float32, as OpenAI sends them)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("input", "'input' must be a string or a non-empty list of strings")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise bad("encoding_format", "'encoding_format' must be float or base64")
    return texts, _number(body, "dimensions", 1, INT32_MAX, integer=True), fmt == "base64"
