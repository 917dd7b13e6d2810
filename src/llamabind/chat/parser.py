"""ChatParser: model output turned into an assistant message (content, reasoning, tool calls)
by llama.cpp's parser for the template's format, whole or while it streams."""

from __future__ import annotations

import json
import threading
from typing import Any

from .._handle import Handle
from ..errors import InvalidInputError
from ..raw import ffi, lib, take_text
from .types import ChatDelta, ChatMessage, ChatPrompt

_ERR = 1024


class ChatParser(Handle):
    """Parses one response to ``prompt`` (what ``ChatTemplates.apply`` returned).

    ``parse(text)`` parses a whole output; ``feed(piece)`` streams: it returns the deltas the
    new text produced, and ``finish()`` the last ones. Concatenated, the deltas equal the final
    ``message``. Output that does not fit the format becomes content, as in llama-server.
    """

    __slots__ = ("_lock", "_done")

    def __init__(self, prompt: ChatPrompt, *, stream: bool = True) -> None:
        params = dict(prompt.parser_params, stream=stream)
        err = ffi.new("char[]", _ERR)
        ptr = lib.llamabind_chat_parser_init(json.dumps(params).encode(), err, _ERR)
        if ptr == ffi.NULL:
            raise InvalidInputError(f"chat parser: {ffi.string(err).decode('utf-8', 'replace')}")
        super().__init__(ptr, lib.llamabind_chat_parser_free)
        self._lock = threading.Lock()
        self._done = False

    def parse(self, text: str, partial: bool = False) -> ChatMessage:
        """The message in ``text`` (``partial``: the output may still go on)."""
        data = _utf8(text)
        err = ffi.new("char[]", _ERR)
        with self._lock:
            out = lib.llamabind_chat_parse(self.ptr, data, len(data), partial, err, _ERR)
        return ChatMessage.from_json(json.loads(take_text(out, err, "chat parse", InvalidInputError)))

    def feed(self, text: str) -> list[ChatDelta]:
        """Append streamed output; the deltas it gave (often none while a marker is incomplete)."""
        return self._feed(text, True)

    def finish(self, text: str = "") -> list[ChatDelta]:
        """The output is complete (with ``text`` as its last piece): the remaining deltas."""
        return self._feed(text, False)

    def _feed(self, text: str, partial: bool) -> list[ChatDelta]:
        data = _utf8(text)
        err = ffi.new("char[]", _ERR)
        with self._lock:
            if self._done:
                raise InvalidInputError("this response is finished: use a new ChatParser")
            out = lib.llamabind_chat_parser_feed(self.ptr, data, len(data), partial, err, _ERR)
            self._done = not partial
        raw: list[dict[str, Any]] = json.loads(take_text(out, err, "chat parse", InvalidInputError))
        return [ChatDelta.from_json(d) for d in raw]

    @property
    def reparses(self) -> int:
        """How many feeds re-parsed the whole output; the others extended the open content or
        reasoning at its end by their text alone (the same message, at the new text's cost)."""
        with self._lock:
            return int(lib.llamabind_chat_parser_reparses(self.ptr))

    @property
    def message(self) -> ChatMessage:
        """The message parsed so far (the final one after ``finish``)."""
        err = ffi.new("char[]", _ERR)
        with self._lock:
            out = lib.llamabind_chat_parser_message(self.ptr, err, _ERR)
        return ChatMessage.from_json(json.loads(take_text(out, err, "chat parse", InvalidInputError)))

    def close(self) -> None:
        with self._lock:
            super().close()


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInputError(f"model output must be str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"model output is not valid UTF-8 (lone surrogate at {e.start})") from None
