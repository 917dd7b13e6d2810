"""The OpenAI response objects, built from engine events: chat completions and their chunks,
text completions, usage and log-probabilities."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

from ..generation.events import DoneEvent, TokenEvent, Usage
from ..generation.logprobs import TokenLogprob
from ..vocab import Vocab

# a request cut short (a deadline, a shutdown, an error after some text) ends as a length limit would
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "deadline": "length", "cancelled": "length",
           "error": "length"}


def finish_reason(done: DoneEvent) -> str:
    return _FINISH.get(done.finish_reason, "stop")


def usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def timings(done: DoneEvent) -> dict[str, Any]:
    """llama-server's ``timings`` extension (milliseconds and tokens per second)."""
    t, u = done.timings, done.usage
    return {"cache_n": u.cached_tokens, "prompt_n": u.prompt_tokens - u.cached_tokens, "prompt_ms": t.prompt_ms,
            "prompt_per_second": t.prompt_tps, "predicted_n": u.completion_tokens, "predicted_ms": t.generation_ms,
            "predicted_per_second": t.generation_tps}


class Pieces:
    """Token text and bytes for log-probabilities, as OpenAI reports them."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        got = self._cache.get(token)
        if got is None:
            piece = self.vocab.token_to_piece(token)
            got = self._cache[token] = (piece.decode("utf-8", "replace"), list(piece))
        return got

    def chat(self, lp: TokenLogprob) -> dict[str, Any]:
        """One entry of a chat response's ``logprobs.content``."""
        text, raw = self(lp.token)
        top = []
        for tok, val in lp.top:
            t, b = self(tok)
            top.append({"token": t, "logprob": val, "bytes": b})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}

    def legacy(self, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """A text completion's ``logprobs`` (tokens, token_logprobs, top_logprobs, text_offset)."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            text = self(lp.token)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in lp.top:  # best first: two tokens with the same text keep the better one
                top.setdefault(self(t)[0], v)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out


class Answer:
    """One request's answer: its id, model name, time; the whole response or its stream of chunks."""

    def __init__(self, kind: str, model: str, pieces: Pieces, top_logprobs: int, plain_chat: bool) -> None:
        self.kind, self.model, self.pieces = kind, model, pieces
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.logprobs = top_logprobs >= 0
        self.plain_chat = plain_chat  # a chat without a Jinja template: no parser, the text is the content
        self.lps: list[TokenLogprob] = []
        self.offset = 0

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def take(self, ev: TokenEvent) -> None:
        """Non-streamed: keep what the response needs from a token."""
        if self.logprobs and ev.logprob is not None:
            self.lps.append(ev.logprob)

    def response(self, done: DoneEvent) -> dict[str, Any]:
        """The whole chat.completion or text_completion object."""
        reason = finish_reason(done)
        if self.kind == "chat":
            msg = done.message.to_openai() if done.message is not None else {"role": "assistant", "content": done.text}
            lp = {"content": [self.pieces.chat(x) for x in self.lps]} if self.logprobs else None
            choice: dict[str, Any] = {"index": 0, "message": msg, "logprobs": lp, "finish_reason": reason}
            obj = self._head("chat.completion")
        else:
            lp = self.pieces.legacy(self.lps) if self.logprobs else None
            choice = {"index": 0, "text": done.text, "logprobs": lp, "finish_reason": reason}
            obj = self._head("text_completion")
        obj.update(choices=[choice], usage=usage(done.usage), timings=timings(done))
        return obj

    # -- streaming -------------------------------------------------------------------------------
    def _chunk(self, payload: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            obj = self._head("chat.completion.chunk")
            choice: dict[str, Any] = {"index": 0, "delta": payload, "logprobs": None, "finish_reason": reason}
        else:
            obj = self._head("text_completion")
            choice = {"index": 0, "text": payload.get("content", ""), "logprobs": None, "finish_reason": reason}
        if self.lps and self.kind == "chat":
            choice["logprobs"] = {"content": [self.pieces.chat(x) for x in self.lps]}
        elif self.lps:
            legacy = choice["logprobs"] = self.pieces.legacy(self.lps, self.offset)
            self.offset += sum(len(t) for t in legacy["tokens"])
        self.lps = []
        obj["choices"] = [choice]
        return obj

    def first(self) -> Iterator[dict[str, Any]]:
        if self.kind == "chat":
            yield self._chunk({"role": "assistant", "content": ""})

    def chunks(self, ev: TokenEvent) -> Iterator[dict[str, Any]]:
        """The chunks one token gives (none while its text is held back); its logprob rides on the next one."""
        self.take(ev)
        if self.kind == "chat" and not self.plain_chat:
            for d in ev.deltas:
                yield self._chunk(d.to_openai())
        elif ev.text:
            yield self._chunk({"content": ev.text})

    def last(self, done: DoneEvent, include_usage: bool) -> Iterator[dict[str, Any]]:
        yield self._chunk({}, finish_reason(done))
        if include_usage:
            obj = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
            obj.update(choices=[], usage=usage(done.usage), timings=timings(done))
            yield obj
