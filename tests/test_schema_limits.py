"""JSON schemas that would hurt the process are refused before llama.cpp's converter sees them:
a ``$ref`` cycle with no schema between (endless recursion in the converter's ``allOf``
handling: a stack overflow, the process gone), nesting past the bounds. Each hostile case runs
in a child process, so a crash shows as a signal instead of a lost test run. A schema that
recurses through a property (a tree) keeps working, as llama.cpp converts it today."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import llamabind as lb
from llamabind.chat import json_schema_to_grammar
from llamabind.gbnf import SchemaLimits, check_json_schema

# allOf -> a -> b -> a: llama.cpp follows $ref targets in allOf with no visited set
CYCLE = {"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
SELF = {"type": "object", "allOf": [{"$ref": "#/definitions/x"}], "definitions": {"x": {"$ref": "#/definitions/x"}}}
# a tree: the recursion goes through an array of children, a schema llama.cpp handles
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
    "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
    "required": ["name"]}}}
OPTIONAL_SELF = {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#"}}}
# a linked list through an optional property, with a $ref to the root's own definition
LIST = {"$ref": "#/definitions/item", "definitions": {"item": {"type": "object", "properties": {
    "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/definitions/item"}, {"type": "null"}]}},
    "required": ["v"]}}}


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def check_survives(code: str) -> str:
    p = run_child(code)
    assert p.returncode == 0, f"child died with {p.returncode}: {p.stderr[-2000:]}"
    return p.stdout


@pytest.mark.parametrize("schema", [CYCLE, SELF], ids=["a-b-a", "self"])
def test_ref_cycle_is_refused_not_a_crash(schema):
    out = check_survives(f"""
        import json
        import llamabind as lb
        from llamabind.chat import json_schema_to_grammar
        for s in (json.loads({json.dumps(json.dumps(schema))}), {json.dumps(json.dumps(schema))}):
            try:
                json_schema_to_grammar(s)
            except lb.InvalidInputError as e:
                print("refused:", e)
    """)
    assert out.count("refused:") == 2 and "cycle" in out, out


def test_ref_cycle_through_generate_and_tools(tiny_model_path, tmp_path):
    """generate(response_format=...) with and without a Jinja template, and a tool's parameters."""
    from tinymodels import write_tiny_llama
    plain = write_tiny_llama(tmp_path / "plain.gguf", template=None)
    out = check_survives(f"""
        import json
        import llamabind as lb
        cycle = json.loads({json.dumps(json.dumps(CYCLE))})
        msgs = [{{"role": "user", "content": "hi"}}]
        rf = {{"type": "json_schema", "json_schema": {{"name": "x", "schema": cycle}}}}
        tools = [{{"type": "function", "function": {{"name": "f", "parameters": cycle}}}}]
        for path, template in (({tiny_model_path!r}, None), ({plain!r}, "chatml")):  # Jinja, built-in
            with lb.Model(path) as m, lb.Context(m, n_ctx=256, n_threads=2) as ctx:
                for kw in (dict(response_format=rf), dict(json_schema=cycle),
                           dict(response_format={{"type": "json_object", "schema": cycle}})):
                    try:
                        lb.generate(ctx, messages=msgs, max_tokens=2, template=template, **kw)
                    except lb.InvalidInputError as e:
                        print("refused:", e)
        with lb.Model({tiny_model_path!r}) as m, lb.Context(m, n_ctx=256, n_threads=2) as ctx:
            try:
                lb.generate(ctx, messages=msgs, max_tokens=2, tools=tools)
            except lb.InvalidInputError as e:
                print("refused:", e)
    """)
    assert out.count("refused:") == 7 and out.count("cycle") == 7, out


@pytest.mark.parametrize("schema", [TREE, LIST], ids=["tree", "list"])
def test_recursive_schema_still_converts(tiny_model, schema):
    grammar = json_schema_to_grammar(schema)
    assert "ref" in grammar and "root ::=" in grammar
    s = lb.Sampler.grammar(tiny_model.vocab, grammar)  # llama.cpp parses it: no left recursion
    s.close()


def test_ref_to_root_is_llama_cpps_own_error():
    """``{"$ref": "#"}`` is no reference llama.cpp resolves (it wants ``#/...``): its error, not a crash."""
    with pytest.raises(lb.InvalidInputError, match="only references into the same document"):
        json_schema_to_grammar(OPTIONAL_SELF)


def nested(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}}
    return s


def test_depth_and_size_bounds():
    json_schema_to_grammar(nested(30))  # 61 levels of JSON
    with pytest.raises(lb.InvalidInputError, match="nests deeper than 64"):
        json_schema_to_grammar(nested(40))
    with pytest.raises(lb.InvalidInputError, match="nests deeper"):
        json_schema_to_grammar('{"items": ' * 100_000 + "{}" + "}" * 100_000)
    with pytest.raises(lb.InvalidInputError, match="more than 50000 values"):
        json_schema_to_grammar({"enum": list(range(60_000))})
    # type lists multiply: llama.cpp builds the schema around one once per type
    blowup: dict = {"type": "string"}
    for _ in range(8):
        blowup = {"type": ["object"] * 4, "properties": {"a": blowup, "b": {"type": "integer"}}}
    with pytest.raises(lb.InvalidInputError, match="expands to more than"):
        json_schema_to_grammar(blowup)
    with pytest.raises(lb.InvalidInputError, match="pattern in the schema nests"):
        json_schema_to_grammar({"type": "string", "pattern": "^" + "(" * 100 + "a" + ")" * 100 + "$"})
    # a chain of $refs, each target adding its depth to what the converter recurses through
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(600)}
    defs["d600"] = {"type": "string"}
    with pytest.raises(lb.InvalidInputError, match="with its \\$ref targets"):
        json_schema_to_grammar({"$ref": "#/$defs/d0", "$defs": defs})
    assert check_json_schema({"$ref": "#/$defs/d0", "$defs": defs}, SchemaLimits(max_ref_depth=10_000))
    for bad in ("[1, 2]", "{", '{"minimum": NaN}'):
        with pytest.raises(lb.InvalidInputError):
            check_json_schema(bad)


def test_response_format_not_a_mapping_without_jinja(tmp_path):
    """llama.cpp's built-in rendering (no Jinja): a json_schema that is no mapping is bad input."""
    from tinymodels import write_tiny_llama
    with lb.Model(write_tiny_llama(tmp_path / "plain.gguf", template=None)) as m, \
            lb.Context(m, n_ctx=256, n_threads=2) as ctx:
        for bad in ("x", [1], 3):
            with pytest.raises(lb.InvalidInputError, match="json_schema must be a mapping"):
                lb.generate(ctx, messages=[{"role": "user", "content": "hi"}], max_tokens=2, template="chatml",
                            response_format={"type": "json_schema", "json_schema": bad})
