"""``truncate="left"``: a prompt too long for the context loses its oldest tokens, not the request.

The kept prefix is the BOS token of a text prompt, or for chat messages everything before the
first non-system message (the system messages and what the template puts with them, such as
tool definitions). What follows it is cut from the left so that ``max_tokens`` (at most half
the context) still fit after the prompt, as llama-server's ``n_keep`` truncation keeps its head.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..context import Context
from ..errors import ContextOverflowError, InvalidInputError

POLICIES = ("left",)


def kept_prefix(ctx: Context, tokens: np.ndarray, text: str | None, messages: Sequence[Mapping[str, Any]] | None,
                add_special: bool) -> int:
    """How many leading tokens a left truncation keeps (see the module's text)."""
    vocab = ctx.vocab
    bos = 1 if tokens.size and vocab.bos is not None and int(tokens[0]) == vocab.bos else 0
    if not messages or text is None:
        return bos
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys].get("role") in ("system", "developer"):
        n_sys += 1
    if n_sys == 0 or n_sys == len(messages):
        return bos
    pos = 0
    for m in messages[:n_sys]:  # where the system text ends in the rendered prompt
        content = m.get("content")
        if not isinstance(content, str) or not content or (at := text.find(content, pos)) < 0:
            return bos
        pos = at + len(content)
    head = text[:pos]
    first = messages[n_sys].get("content")
    if isinstance(first, str) and first and (at := text.find(first, pos)) >= 0:
        head = text[:at]  # up to the first message's own text: its role header stays
    prefix = vocab.tokenize(head, add_special=add_special and not vocab.starts_with_bos(text), parse_special=True)
    n = min(prefix.size, tokens.size)
    diff = np.flatnonzero(prefix[:n] != tokens[:n])
    return int(diff[0]) if diff.size else n


def truncate_left(ctx: Context, tokens: np.ndarray, policy: str, max_tokens: int, n_keep: int) -> tuple[np.ndarray, int]:
    """The prompt cut to leave room for ``max_tokens`` (at most half the context) after it, keeping
    its first ``n_keep`` tokens; and how many tokens were cut."""
    if policy not in POLICIES:
        raise InvalidInputError(f"truncate must be one of {POLICIES} or None, not {policy!r}")
    n_ctx = ctx.n_ctx_seq
    limit = n_ctx - max(1, min(max_tokens, n_ctx // 2))
    if tokens.size <= limit:
        return tokens, 0
    if n_keep >= limit // 2:
        raise ContextOverflowError(f"the prompt's kept prefix (BOS and system messages: {n_keep} tokens) leaves no "
                                   f"room in a context of {n_ctx} tokens per sequence; raise n_ctx")
    tail = limit - n_keep
    return np.concatenate([tokens[:n_keep], tokens[tokens.size - tail:]]), int(tokens.size - limit)
