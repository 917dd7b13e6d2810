"""A thinking budget: after N reasoning tokens the end-of-thinking tag is forced, as llama.cpp's
reasoning-budget sampler (common/reasoning-budget.cpp) does for llama-server's
``reasoning_budget_tokens``, here as a state machine the decode loop asks before it samples."""

from __future__ import annotations

from typing import Sequence

from ..chat import ChatPrompt
from ..vocab import Vocab

IDLE, COUNTING, WAITING_UTF8, FORCING, DONE = range(5)


class ReasoningBudget:
    """Counts tokens between a start tag and an end tag; when ``budget`` are spent (and the last
    character is complete) the loop takes ``forced`` tokens (the first end tag) instead of sampling.
    A new start tag after the end opens a fresh budget (some models think more than once)."""

    __slots__ = ("start", "ends", "forced_tokens", "budget", "remaining", "state", "pos", "hist")

    def __init__(self, start: Sequence[int], ends: Sequence[Sequence[int]], forced: Sequence[int],
                 budget: int) -> None:
        self.start = tuple(start)
        self.ends = [tuple(e) for e in ends if e]
        self.forced_tokens = tuple(forced)
        self.budget = budget
        self.remaining = budget
        self.state = IDLE
        self.pos = 0
        self.hist: list[int] = []  # the tokens since the last transition, for tag matching

    @classmethod
    def for_prompt(cls, vocab: Vocab, prompt: ChatPrompt, budget: int,
                   prefill: Sequence[int] = ()) -> "ReasoningBudget | None":
        """The budget for a rendered chat prompt, from its template's thinking tags (None if it has
        none); ``prefill``: the generation prompt's tokens, which may already open the thinking."""
        if not prompt.thinking_start_tag or not prompt.thinking_end_tags:
            return None

        def tokens(text: str) -> list[int]:
            return [int(t) for t in vocab.tokenize(text, add_special=False, parse_special=True)]

        ends = [tokens(t) for t in prompt.thinking_end_tags]
        rb = cls(tokens(prompt.thinking_start_tag), ends, ends[0], budget)
        for t in prefill:
            rb.accept(t, False)
        return rb

    def forced(self) -> int | None:
        """The token the loop must take next, or None to sample as usual."""
        return self.forced_tokens[self.pos] if self.state == FORCING else None

    def _match(self, token: int, seqs: Sequence[tuple[int, ...]]) -> bool:
        h = self.hist
        h.append(token)
        if any(len(h) >= len(q) and tuple(h[-len(q):]) == q for q in seqs):
            h.clear()
            return True
        if len(h) > 64:
            del h[:-32]
        return False

    def _open(self) -> None:
        self.remaining = self.budget
        self.state, self.pos = (FORCING, 0) if self.budget <= 0 else (COUNTING, 0)

    def accept(self, token: int, utf8_pending: bool) -> None:
        """Take the token that was chosen; ``utf8_pending``: it ended inside a character."""
        state = self.state
        if state in (IDLE, DONE):
            if self._match(token, (self.start,)):
                self._open()
        elif state == FORCING:
            self.pos += 1
            if self.pos >= len(self.forced_tokens):
                self.state = DONE
                self.hist.clear()
        elif self._match(token, self.ends):
            self.state = DONE
        elif state == WAITING_UTF8:
            if not utf8_pending:
                self.state, self.pos = FORCING, 0
        else:
            self.remaining -= 1
            if self.remaining <= 0:
                self.state, self.pos = (WAITING_UTF8, 0) if utf8_pending else (FORCING, 0)
                self.hist.clear()
