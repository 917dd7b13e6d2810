"""Checks on GBNF grammar text before llama.cpp parses it: size, rules, alternations, nesting.

llama.cpp's grammar parser and sampler do work (and take stack) in proportion to what a grammar
holds: a server that takes grammars from clients bounds them first. ``check_grammar`` counts
what matters with a small lexer (comments, string literals and character classes skipped) and
raises InvalidInputError naming the limit that was passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidInputError

# llama.cpp's parser recurses once per nesting level: deeper grammars overflow the stack
MAX_NESTING = 2000

_RULE = re.compile(r"(?m)^[ \t]*([A-Za-z0-9_-]+)[ \t]*::=")


@dataclass(frozen=True, slots=True)
class GrammarStats:
    """What a GBNF grammar holds: its UTF-8 size, rules, alternatives (``|`` outside literals) and nesting."""

    n_bytes: int
    n_rules: int
    n_alternations: int
    depth: int


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """Upper bounds for ``check_grammar`` (None: unbounded)."""

    max_bytes: int | None = None
    max_rules: int | None = None
    max_alternations: int | None = None
    max_depth: int = MAX_NESTING


def nesting(text: str) -> int:
    """Deepest nesting of brackets in ``text`` (an upper bound: quoting is not parsed)."""
    depth = most = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            most = max(most, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return most


def grammar_stats(grammar: str) -> GrammarStats:
    """Count a grammar's rules and alternatives (``|`` outside comments, literals and classes)."""
    if not isinstance(grammar, str):
        raise InvalidInputError(f"grammar must be str, not {type(grammar).__name__}")
    n_alt, i, n = 0, 0, len(grammar)
    while i < n:
        ch = grammar[i]
        if ch == "#":
            j = grammar.find("\n", i)
            i = n if j < 0 else j
        elif ch in "\"[":
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif ch == "|":
            n_alt += 1
        i += 1
    return GrammarStats(len(grammar.encode("utf-8", "surrogatepass")), len(_RULE.findall(grammar)), n_alt,
                        nesting(grammar))


def check_grammar(grammar: str, limits: GrammarLimits | None = None) -> GrammarStats:
    """The grammar's stats, or InvalidInputError if it passes one of ``limits`` (nesting always bounded)."""
    if limits is not None and not isinstance(limits, GrammarLimits):
        raise InvalidInputError(f"limits must be a GrammarLimits, not {type(limits).__name__}")
    lim = limits or GrammarLimits()
    if lim.max_bytes is not None and isinstance(grammar, str) and len(grammar) > lim.max_bytes:
        raise InvalidInputError(f"grammar has at least {len(grammar)} bytes, more than the {lim.max_bytes} allowed")
    stats = grammar_stats(grammar)
    if stats.depth > lim.max_depth:
        raise InvalidInputError(f"grammar nests deeper than {lim.max_depth} levels")
    for what, have, most in (("bytes", stats.n_bytes, lim.max_bytes), ("rules", stats.n_rules, lim.max_rules),
                             ("alternatives", stats.n_alternations, lim.max_alternations)):
        if most is not None and have > most:
            raise InvalidInputError(f"grammar has {have} {what}, more than the {most} allowed")
    return stats
