"""ChatTemplates: a model's Jinja chat templates, run by llama.cpp's own engine (common/chat.h
through llamabind's chat shim), rendering OpenAI-shaped conversations exactly as llama-server does."""

from __future__ import annotations

import json
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .._handle import Handle
from ..errors import InputNotFoundError, InvalidInputError
from ..raw import ffi, lib, take_text
from .grammar import check_request_schemas
from .types import ChatPrompt

if TYPE_CHECKING:
    from ..model import Model

ROLES = ("system", "developer", "user", "assistant", "tool")
_ERR = 1024


class ChatTemplates(Handle):
    """The templates of ``model`` (its default and its ``tool_use`` variant), or ``template``:
    Jinja text, a path to a ``.jinja`` file, or the name of a template stored in the GGUF.

    A model without any template gets chatml, as in llama-server. Rendering is thread-safe.
    Use ``ChatTemplates.for_model`` to share one per model and template.
    """

    __slots__ = ("_model", "_info", "_lock")

    def __init__(self, model: "Model", template: str | os.PathLike[str] | None = None) -> None:
        src = _template_source(model, template)
        err = ffi.new("char[]", _ERR)
        ptr = lib.llamabind_chat_templates_init(model.ptr, src.encode() if src else ffi.NULL, err, _ERR)
        if ptr == ffi.NULL:
            raise InvalidInputError(f"chat template does not parse: {ffi.string(err).decode('utf-8', 'replace')}")
        super().__init__(ptr, lib.llamabind_chat_templates_free, parent=model)
        self._model = model
        self._lock = threading.Lock()  # close waits for a render in flight
        self._info: dict[str, Any] = json.loads(
            take_text(lib.llamabind_chat_templates_info(ptr, err, _ERR), err, "chat template", InvalidInputError))

    _shared: "weakref.WeakKeyDictionary[Model, dict[str | None, ChatTemplates]]" = weakref.WeakKeyDictionary()
    _shared_lock = threading.Lock()

    @classmethod
    def for_model(cls, model: "Model", template: str | os.PathLike[str] | None = None) -> "ChatTemplates":
        """The model's templates, parsed once per model and template and then reused."""
        key = os.fspath(template) if template is not None else None
        with cls._shared_lock:
            per_model = cls._shared.setdefault(model, {})
            t = per_model.get(key)
            if t is None or t.closed:
                t = per_model[key] = cls(model, template)
            return t

    def close(self) -> None:
        with self._lock:
            super().close()

    # -- what the template is and can do --------------------------------------------------------
    @property
    def source(self) -> str:
        """The default template's Jinja source."""
        return self._info["source"]

    @property
    def tool_use_source(self) -> str:
        """The ``tool_use`` variant's source ("" when the model has none)."""
        return self._info["tool_use_source"]

    @property
    def caps(self) -> dict[str, bool]:
        """llama.cpp's reading of the template: supports_tools, supports_system_role, ..."""
        return dict(self._info["caps"])

    supports_tools = property(lambda self: bool(self._info["caps"].get("supports_tools")),
                              doc="the template renders tool definitions")
    supports_tool_calls = property(lambda self: bool(self._info["caps"].get("supports_tool_calls")),
                                   doc="the template renders assistant tool calls")
    supports_system_role = property(lambda self: bool(self._info["caps"].get("supports_system_role")),
                                    doc="the template has a system role")
    supports_thinking = property(lambda self: bool(self._info["supports_enable_thinking"]),
                                 doc="the template switches reasoning on and off (enable_thinking)")

    # -- rendering ----------------------------------------------------------------------------
    def apply(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
              tool_choice: str | Mapping[str, Any] | None = None, parallel_tool_calls: bool | None = None,
              enable_thinking: bool | None = None, reasoning_format: str | None = None,
              reasoning_effort: str | None = None, response_format: Mapping[str, Any] | None = None,
              json_schema: Mapping[str, Any] | None = None, grammar: str | None = None,
              add_generation_prompt: bool | None = None, continue_final_message: bool | str | None = None,
              chat_template_kwargs: Mapping[str, Any] | None = None, now: int | None = None,
              media: bool = False) -> ChatPrompt:
        """Render a conversation; the arguments mean what they mean in an OpenAI chat request
        (and llama-server's extensions). ``now`` (Unix seconds) fixes the date templates print;
        ``media`` allows image/audio parts, which become libmtmd markers."""
        if not isinstance(messages, (list, tuple)):
            raise InvalidInputError("'messages' must be a list of messages")
        body: dict[str, Any] = {"messages": list(messages)}
        for key, value in (("tools", tools), ("tool_choice", tool_choice), ("parallel_tool_calls", parallel_tool_calls),
                           ("reasoning_format", reasoning_format), ("reasoning_effort", reasoning_effort),
                           ("response_format", response_format), ("json_schema", json_schema), ("grammar", grammar),
                           ("add_generation_prompt", add_generation_prompt),
                           ("continue_final_message", continue_final_message),
                           ("chat_template_kwargs", chat_template_kwargs)):
            if value is not None:
                body[key] = dict(value) if isinstance(value, Mapping) else value
        options: dict[str, Any] = {}
        if enable_thinking is not None:
            options["enable_thinking"] = bool(enable_thinking)
        if now is not None:
            options["now"] = int(now)
        return self.apply_request(body, media=media, **options)

    def apply_request(self, body: Mapping[str, Any], *, media: bool = False, **options: Any) -> ChatPrompt:
        """Render an OpenAI chat-completion request body as llama-server's ``/apply-template``
        would; ``options`` are the server-side settings (``reasoning_format``, ``enable_thinking``,
        ``prefill_assistant``, ``chat_template_kwargs``, ``now``)."""
        _check_request(body)
        opts = dict(options)
        opts.setdefault("reasoning_format", "deepseek")  # llama-server's defaults
        opts["chat_template_kwargs"] = {"preserve_reasoning": True, **dict(opts.get("chat_template_kwargs") or {})}
        opts["allow_media"] = media
        opts["media_marker"] = ffi.string(lib.mtmd_default_marker()).decode()
        try:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            opt = json.dumps(opts).encode()
        except (TypeError, ValueError, UnicodeEncodeError) as e:
            raise InvalidInputError(f"the chat request is not JSON: {e}") from None
        err = ffi.new("char[]", _ERR)
        with self._lock:
            out = lib.llamabind_chat_apply(self.ptr, data, opt, err, _ERR)
        return ChatPrompt.from_json(json.loads(take_text(out, err, "chat template", InvalidInputError)))


def _template_source(model: "Model", template: str | os.PathLike[str] | None) -> str:
    """Jinja text for ``template``: as given, read from a file, or a template named in the GGUF."""
    if template is None:
        return ""
    if isinstance(template, os.PathLike) or (isinstance(template, str) and template.endswith(".jinja")
                                             and "{" not in template):
        try:
            with open(template, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise InputNotFoundError(f"no chat template file {os.fspath(template)!r}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read chat template {os.fspath(template)!r}: {e}") from None
    if not isinstance(template, str) or "\0" in template:
        raise InvalidInputError("template must be Jinja text, a .jinja path or a template name")
    if "{" not in template:  # a name: a variant stored in the GGUF, such as "tool_use"
        named = model.chat_template(template)
        if named is None:
            raise InvalidInputError(f"the model has no chat template named {template!r}")
        return named
    return template


def _check_request(body: Mapping[str, Any]) -> None:
    """What would make llama.cpp's request parsing misbehave, refused with a clear message."""
    if not isinstance(body, Mapping):
        raise InvalidInputError("the chat request must be a mapping")
    messages = body.get("messages")
    if not isinstance(messages, (list, tuple)):
        raise InvalidInputError("'messages' must be a list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"message {i} must be a mapping with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidInputError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise InvalidInputError(f"message {i}: content must be a string or a list of parts")
        for j, call in enumerate(m.get("tool_calls") or ()):
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise InvalidInputError(f"message {i}: tool call {j} needs a function with a name")
    _check_tools(body.get("tools"))
    check_request_schemas(body)  # before llama.cpp converts them: a $ref cycle would overflow its stack


def _check_tools(tools: Iterable[Any] | None) -> None:
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise InvalidInputError("'tools' must be a list")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise InvalidInputError(f"tool {i} must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidInputError(f"tool {i} needs a function name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidInputError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
        if isinstance(params, Mapping) and "type" in params and not isinstance(params["type"], (str, list)):
            raise InvalidInputError(f"tool {fn['name']!r}: parameters 'type' must be a string or a list")
