"""Chat through the decode loop: generate(messages=..., tools=..., response_format=...) renders
with the model's Jinja template, applies its grammar, stops and preserved tokens, and parses the
output while it streams; bad chat input is refused cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import llamabind as lb
from llamabind.chat import ChatTemplates, json_schema_to_grammar
from conftest import TEMPLATES
from tinymodels import write_tiny_llama

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, llama_test_material, chat_templates_dir):
    """A tiny random model with Qwen's vocabulary and Qwen3's template stored in its GGUF."""
    path = write_tiny_llama(tmp_path_factory.mktemp("qwen") / "qwen3.gguf", n_embd=16, n_ff=32, f16=True,
                            template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(),
                            vocab_from=llama_test_material / "models" / "ggml-vocab-qwen2.gguf")
    with lb.Model(path) as m:
        yield m


@pytest.fixture
def qctx(qwen):
    with lb.Context(qwen, n_ctx=1024, n_threads=2) as c:
        yield c


def _run(ctx, **kw):
    tokens, deltas, done = [], [], None
    for ev in lb.generate(ctx, **kw):
        if isinstance(ev, lb.DoneEvent):
            done = ev
        else:
            tokens.append(ev)
            deltas += ev.deltas
    return tokens, deltas, done


def test_messages_render_with_the_models_jinja_template(qctx):
    prompt = ChatTemplates.for_model(qctx.model).apply(ASK)
    expected = qctx.vocab.tokenize(prompt.prompt, add_special=False, parse_special=True)
    rendered = lb.generation.render_prompt(qctx, messages=ASK)
    assert np.array_equal(rendered, expected)


class Script(lb.PySampler):
    """Makes the model say ``tokens`` (then end): the rest of the chain, the template's lazy
    grammar included, must accept every one of them."""

    def __init__(self, tokens, eos):
        super().__init__()
        self.todo = list(tokens) + [eos]

    def apply(self, cur):
        want = self.todo[0] if self.todo else self.todo[-1]
        hit = cur.data["id"] == want
        assert hit.any(), f"the grammar ruled out token {want}"
        cur.data["logit"][~hit] = -np.inf

    def accept(self, token):
        if self.todo and token == self.todo[0]:
            self.todo.pop(0)


def test_a_tool_call_streams_through_the_lazy_grammar_and_ends_in_tool_calls(qctx):
    vocab = qctx.vocab
    said = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    script = Script(vocab.tokenize(said, add_special=False, parse_special=True), vocab.eos)
    sampler = lb.Sampler.chain(script.as_sampler(), lb.Sampler.greedy())
    _, deltas, done = _run(qctx, messages=ASK, tools=TOOLS, sampler=sampler, max_tokens=100, enable_thinking=False)
    assert done.finish_reason == "tool_calls", done.text
    assert done.text == said
    call = done.message.tool_calls[0]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"}) and call.id
    streamed = [d.tool_call for d in deltas if d.tool_call]
    assert streamed[0].name == "get_weather" and streamed[0].id == call.id
    assert "".join(t.arguments for t in streamed) == call.arguments
    assert "".join(d.content for d in deltas) == done.message.content == ""


def test_json_schema_response_format_constrains_the_output(qctx):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    _, deltas, done = _run(qctx, messages=ASK, max_tokens=60, enable_thinking=False,
                           response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    text = done.text.strip()
    if done.finish_reason == "stop":
        assert isinstance(json.loads(text.strip("`").removeprefix("json"))["ok"], bool)
    else:  # the random model may run out of tokens mid-object: what came out is still a JSON prefix
        assert text.startswith(("{", "```json"))


def test_gemma_answers_with_json_that_validates(gemma_ctx):
    """End to end with the default model (no template in its GGUF: llama.cpp's built-in gemma format)."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    done = lb.complete(gemma_ctx, messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
                       max_tokens=64, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert done.finish_reason == "stop", done.text
    obj = json.loads(done.text)
    assert set(obj) == {"city", "population"}
    assert isinstance(obj["city"], str) and isinstance(obj["population"], int)


def test_plain_prompts_have_no_chat_parse(qctx):
    _, deltas, done = _run(qctx, prompt="hello", max_tokens=4)
    assert not deltas and done.message is None


BAD = [
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "role 'wizard'"),
    (dict(messages=[{"content": "hi"}]), "role None"),
    (dict(messages="hi"), "must be a list"),
    (dict(messages=[["user", "hi"]]), "must be a mapping"),
    (dict(messages=[{"role": "user", "content": 5}]), "content must be"),
    (dict(messages=[{"role": "user"}]), "must contain 'content'"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "image"),
    (dict(messages=[{"role": "user", "content": [{"type": "bogus"}]}]), "unsupported content"),
    (dict(messages=ASK, tools=[{"type": "function", "function": {"name": "f", "parameters": "nope"}}]), "JSON schema"),
    (dict(messages=ASK, tools=[{"type": "function", "function": {}}]), "function name"),
    (dict(messages=ASK, tools="x"), "must be a list"),
    (dict(messages=ASK, response_format={"type": "xml"}), "response_format type"),
    (dict(messages=ASK, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}), "unrecognized type nonsense"),
    (dict(messages=ASK, chat_template_kwargs={"enable_thinking": "yes"}), "enable_thinking"),
    (dict(messages=ASK, chat_template_kwargs={"x": object()}), "not JSON"),
    (dict(messages=ASK + [{"role": "assistant", "content": "a"}], add_generation_prompt=True,
          continue_final_message=True), "add_generation_prompt"),
    (dict(prompt="hi", tools=TOOLS), "need messages"),
    (dict(messages=ASK, template="{% if %}"), "does not parse"),
    (dict(messages=ASK, template="no_such_variant"), "no chat template named"),
    (dict(messages=ASK, template="/nonexistent/t.jinja"), "no chat template file"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_chat_input_is_refused_and_the_context_stays_usable(qctx, kwargs, match):
    with pytest.raises(lb.InvalidInputError, match=match):
        lb.complete(qctx, max_tokens=4, **kwargs)
    assert lb.complete(qctx, messages=ASK, max_tokens=2).usage.completion_tokens >= 1


def test_a_template_that_fails_at_render_time_says_where(qwen):
    with pytest.raises(lb.InvalidInputError, match="line 2, column 14"):
        ChatTemplates(qwen, "{% for m in messages %}\n{{ m.content | nosuchfilter }}{% endfor %}").apply(ASK)


def test_json_schema_to_grammar_is_llama_cpps():
    g = json_schema_to_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert "root ::=" in g
    with pytest.raises(lb.InvalidInputError):
        json_schema_to_grammar("{not json")
