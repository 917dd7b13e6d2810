"""Chat as llama-server does it: the model's Jinja templates (tools, reasoning, content parts),
the grammar a request asks for (tool calls, JSON schema), and model output parsed back into
content, reasoning and tool calls, whole or while it streams. All of it is llama.cpp's own
code (common/chat.h) behind llamabind's chat shim; nothing is re-implemented here."""

from .grammar import chat_sampler, json_schema_to_grammar, preserved_token_ids
from .parser import ChatParser
from .templates import ChatTemplates
from .types import ChatDelta, ChatMessage, ChatPrompt, GrammarTrigger, ToolCall, ToolCallDelta

__all__ = ["ChatTemplates", "ChatParser", "ChatPrompt", "ChatMessage", "ChatDelta", "ToolCall", "ToolCallDelta",
           "GrammarTrigger", "chat_sampler", "json_schema_to_grammar", "preserved_token_ids"]
