"""Checks on GBNF grammars and JSON schemas before llama.cpp parses or converts them.

llama.cpp's grammar parser and sampler do work (and take stack) in proportion to what a grammar
holds: a server that takes grammars from clients bounds them first. ``check_grammar`` counts
what matters with a small lexer (comments, string literals and character classes skipped) and
raises InvalidInputError naming the limit that was passed.

llama.cpp's JSON schema converter recurses through a schema, following each ``$ref`` (to
``#/...`` in the same document) the first time it meets it; a ``$ref`` whose target is a
``$ref`` back (a chain with no schema between) sends its ``allOf`` handling into endless
recursion, a stack overflow no ``try`` catches. ``check_json_schema`` refuses those chains, and
bounds the nesting the converter recurses through, before any conversion.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

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


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Upper bounds for ``check_json_schema``. ``max_depth``: JSON nesting of the schema document
    (and bracket nesting of a ``pattern``); ``max_nodes``: JSON values, a ``type`` list counted as
    the copies llama.cpp builds of the schema around it; ``max_ref_depth``: nesting with every
    ``$ref`` target's own depth added (a bound on the converter's recursion; measured at about
    0.7 KiB of stack a level: 2000 levels take 1.4 MiB of a thread's 8 MiB)."""

    max_depth: int = 64
    max_nodes: int = 50_000
    max_ref_depth: int = 2000


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _resolve(root: Any, ref: str) -> Any:
    """The value a ``$ref`` names, as llama.cpp resolves it (``#/`` then ``/``-separated keys or
    array indices, nothing unescaped); None where llama.cpp would fail (or not look at all)."""
    if not ref.startswith("#/"):
        return None  # llama.cpp refuses it (only references into the same document)
    node = root
    for sel in ref[1:].split("/")[1:]:
        if isinstance(node, Mapping) and sel in node:
            node = node[sel]
        elif isinstance(node, list):
            m = re.match(r"\s*\+?(\d+)", sel)  # as std::stoull reads it
            if m is None or int(m.group(1)) >= len(node):
                return None
            node = node[int(m.group(1))]
        else:
            return None
    return node


def check_json_schema(schema: Mapping[str, Any] | str, limits: SchemaLimits | None = None) -> Any:
    """The schema (parsed, if given as JSON text), or InvalidInputError: not JSON, a ``$ref``
    cycle with no schema between (``a`` -> ``b`` -> ``a``), or past one of ``limits``."""
    if limits is not None and not isinstance(limits, SchemaLimits):
        raise InvalidInputError(f"limits must be a SchemaLimits, not {type(limits).__name__}")
    lim = limits or SchemaLimits()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema, parse_constant=_no_constant)
        except RecursionError:
            raise InvalidInputError(f"the schema nests deeper than {lim.max_depth} levels") from None
        except ValueError as e:
            raise InvalidInputError(f"the schema is not JSON: {e}") from None
    if not isinstance(schema, Mapping):
        raise InvalidInputError(f"a JSON schema must be an object, not {type(schema).__name__}")
    # pre-order walk (no recursion: the schema may nest deeper than Python's stack), then sizes bottom-up
    order: list[tuple[Any, int, int]] = []  # (value, depth, parent index)
    todo: list[tuple[Any, int, int]] = [(schema, 1, -1)]
    refs: set[str] = set()
    while todo:
        value, depth, parent = todo.pop()
        if depth > lim.max_depth:
            raise InvalidInputError(f"the schema nests deeper than {lim.max_depth} levels")
        if len(order) >= lim.max_nodes:
            raise InvalidInputError(f"the schema has more than {lim.max_nodes} values")
        i = len(order)
        order.append((value, depth, parent))
        if isinstance(value, Mapping):
            ref, pattern = value.get("$ref"), value.get("pattern")
            if isinstance(ref, str):
                refs.add(ref)
            if isinstance(pattern, str) and nesting(pattern) > lim.max_depth:
                raise InvalidInputError(f"a pattern in the schema nests deeper than {lim.max_depth} levels")
            children = list(value.values())
        elif isinstance(value, (list, tuple)):
            children = list(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"the schema holds {value}, which is not JSON")
        else:
            children = []
        todo.extend((c, depth + 1, i) for c in children)
    size = [1] * len(order)
    height = [1] * len(order)
    for i in range(len(order) - 1, 0, -1):
        value, _, parent = order[i]
        kinds = value.get("type") if isinstance(value, Mapping) else None
        if isinstance(kinds, list) and len(kinds) > 1:  # llama.cpp builds the schema once per type
            size[i] *= len(kinds)
        size[parent] += size[i]
        height[parent] = max(height[parent], height[i] + 1)
    kinds = schema.get("type")
    if isinstance(kinds, list) and len(kinds) > 1:
        size[0] *= len(kinds)
    if size[0] > lim.max_nodes:
        raise InvalidInputError(f"the schema expands to more than {lim.max_nodes} values (its 'type' lists)")
    heights = {id(v): h for (v, _, _), h in zip(order, height)}
    total, ends = height[0], set()  # ends: refs whose chain reaches a schema (or llama.cpp's own error)
    for ref in sorted(refs):
        chain, on, target = [ref], {ref}, _resolve(schema, ref)
        while isinstance(target, Mapping) and isinstance(target.get("$ref"), str) and target["$ref"] not in ends:
            nxt = target["$ref"]
            if nxt in on:
                raise InvalidInputError("the schema's $ref cycle has no schema in it: " + " -> ".join(chain + [nxt]))
            chain.append(nxt)
            on.add(nxt)
            target = _resolve(schema, nxt)
        ends.update(chain)
        total += heights.get(id(_resolve(schema, ref)), 0)
    if total > lim.max_ref_depth:
        raise InvalidInputError(f"the schema, with its $ref targets, nests deeper than {lim.max_ref_depth} levels")
    return schema
