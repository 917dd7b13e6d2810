"""What chat rendering and parsing give back, shaped like OpenAI's chat API: the rendered
prompt with what sampling needs, an assistant message, and a stream's deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made: ``arguments`` is the JSON text the model wrote."""

    name: str
    arguments: str
    id: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """An assistant message parsed from model output (llama.cpp's common_chat_parse)."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ChatMessage":
        content = obj.get("content") or ""
        if isinstance(content, list):  # content parts: their text, joined as llama.cpp joins typed text
            content = "\n".join(p.get("text", "") for p in content)
        calls = tuple(ToolCall(c["function"]["name"], c["function"]["arguments"], c.get("id") or "")
                      for c in obj.get("tool_calls") or ())
        return cls(content, obj.get("reasoning_content") or "", calls)

    def to_openai(self) -> dict[str, Any]:
        """The message as OpenAI returns it (``content`` None when there are only tool calls)."""
        msg: dict[str, Any] = {"role": "assistant",
                               "content": self.content if self.content or not self.tool_calls else None}
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call ``index``: its id and name come first, then argument fragments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """One streamed change to the assistant message: exactly one field is set."""

    content: str = ""
    reasoning_content: str = ""
    tool_call: ToolCallDelta | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ChatDelta":
        if "index" in obj:
            return cls(tool_call=ToolCallDelta(int(obj["index"]), obj.get("id", ""), obj.get("name", ""),
                                               obj.get("arguments", "")))
        return cls(obj.get("content", ""), obj.get("reasoning_content", ""))

    def to_openai(self) -> dict[str, Any]:
        """The ``delta`` object of an OpenAI chat.completion.chunk."""
        if self.tool_call is not None:
            t = self.tool_call
            fn: dict[str, str] = {"arguments": t.arguments}
            if t.name:
                fn["name"] = t.name
            call: dict[str, Any] = {"index": t.index, "function": fn}
            if t.id:
                call["id"], call["type"] = t.id, "function"
            return {"tool_calls": [call]}
        if self.reasoning_content:
            return {"reasoning_content": self.reasoning_content}
        return {"content": self.content}


@dataclass(frozen=True, slots=True)
class GrammarTrigger:
    """Where a lazy grammar starts applying: a word, a regular expression (``pattern``, or
    ``pattern_full`` matching the whole output so far), or a token."""

    kind: str
    value: str
    token: int = -1


_TRIGGER_KINDS = ("token", "word", "pattern", "pattern_full")


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered conversation: the prompt text and everything sampling and parsing need,
    as llama-server derives it from the same request."""

    prompt: str
    format: str
    stop: tuple[str, ...] = ()
    grammar: str = ""
    grammar_lazy: bool = False
    grammar_triggers: tuple[GrammarTrigger, ...] = ()
    preserved_tokens: tuple[str, ...] = ()
    generation_prompt: str = ""
    parse_tool_calls: bool = False
    reasoning_format: str = "none"
    enable_thinking: bool = False
    supports_thinking: bool = False
    thinking_start_tag: str = ""
    thinking_end_tags: tuple[str, ...] = ()
    is_continuation: bool = False
    media: tuple[dict[str, str], ...] = ()
    parser_params: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ChatPrompt":
        triggers = tuple(GrammarTrigger(_TRIGGER_KINDS[t["type"]], t["value"], int(t.get("token", -1)))
                         for t in obj["grammar_triggers"])
        parser = {k: obj[k] for k in ("format", "generation_prompt", "parser", "reasoning_format",
                                      "parse_tool_calls", "is_continuation")}
        return cls(obj["prompt"], obj["format_name"], tuple(obj["stop"]), obj["grammar"], obj["grammar_lazy"],
                   triggers, tuple(obj["preserved_tokens"]), obj["generation_prompt"], obj["parse_tool_calls"],
                   obj["reasoning_format"], obj["enable_thinking"], obj["supports_thinking"],
                   obj["thinking_start_tag"], tuple(obj["thinking_end_tags"]), obj["is_continuation"],
                   tuple(obj["media"]), parser)
