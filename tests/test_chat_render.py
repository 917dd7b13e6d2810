"""Chat rendering equals llama-server's, byte for byte: every real template in the pinned tree's
models/templates, loaded into a tiny model with the matching llama.cpp vocabulary, renders a set
of conversations exactly as native llama-server's POST /apply-template renders them."""

from __future__ import annotations

import concurrent.futures
import copy
import os

import pytest

import llamabind as lb
from llamabind.chat import ChatTemplates
from chatoracle import LlamaServer, vocab_for
from conftest import TEMPLATES

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}]
CALL = {"id": "call_abc123def", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}

CONVERSATIONS = {
    "plain": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system": {"messages": [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "What is 2+2?"}]},
    "multi_turn": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello, how can I help?"},
                                {"role": "user", "content": "Tell me a joke."}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
    "tool_result": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                 {"role": "tool", "tool_call_id": "call_abc123def", "content": "18 C, sunny"}],
                    "tools": TOOLS},
    "reasoning_on": {"messages": [{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                                  {"role": "user", "content": "3+3?"}],
                     "chat_template_kwargs": {"enable_thinking": True}},
    "reasoning_off": {"messages": [{"role": "user", "content": "2+2?"}],
                      "chat_template_kwargs": {"enable_thinking": False}},
    "content_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part one."},
                                                                {"type": "text", "text": "Part two."}]}]},
    "prefill": {"messages": [{"role": "user", "content": "Count to three."},
                             {"role": "assistant", "content": "One, two"}]},
}

TEMPLATE_FILES = sorted(p.name for p in TEMPLATES.glob("*.jinja"))


def test_the_pinned_tree_has_the_templates():
    assert len(TEMPLATE_FILES) >= 70, TEMPLATE_FILES


def _ours(model: lb.Model, source: str, body: dict) -> tuple[bool, str]:
    try:
        return True, ChatTemplates(model, source).apply_request(copy.deepcopy(body)).prompt
    except lb.InvalidInputError as e:
        return False, str(e)


def _check_template(server_bin, vocab_model, name: str) -> list[str]:
    """Render every conversation both ways; the differences, described."""
    path = TEMPLATES / name
    model_path = vocab_model(vocab_for(name))
    problems = []
    with lb.Model(model_path, vocab_only=True) as model, LlamaServer(server_bin, model_path, path) as server:
        source = path.read_text()
        for conv, body in CONVERSATIONS.items():
            status, theirs = server.post("/apply-template", body)
            ok, ours = _ours(model, source, body)
            if status == 200 and not ok:
                problems.append(f"{name} / {conv}: the server renders it, llamabind raised: {ours}")
            elif status == 200 and ours != theirs["prompt"]:
                problems.append(f"{name} / {conv}: prompts differ\n--- server\n{theirs['prompt']!r}\n"
                                f"--- llamabind\n{ours!r}")
            elif status != 200 and ok:
                problems.append(f"{name} / {conv}: the server refused it ({status}: {theirs}), llamabind rendered it")
    return problems


def test_every_template_renders_as_llama_server_does(native_tool, vocab_model, chat_templates_dir):
    server_bin = native_tool("llama-server")
    for v in {vocab_for(n) for n in TEMPLATE_FILES}:  # written up front, not from several threads
        vocab_model(v)
    problems: list[str] = []
    workers = max(2, min(4, os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for found in pool.map(lambda n: _check_template(server_bin, vocab_model, n), TEMPLATE_FILES):
            problems += found
    assert not problems, "\n\n".join(problems[:10]) + f"\n\n({len(problems)} differences)"


def test_a_template_stored_in_the_gguf_renders_as_the_server_does(native_tool, tmp_path, chat_templates_dir,
                                                                  llama_test_material):
    """The model's own template (read from the GGUF, not given as text) and its tool_use variant."""
    from tinymodels import write_tiny_llama

    source = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    path = write_tiny_llama(tmp_path / "qwen3-tmpl.gguf", n_embd=16, n_ff=32, f16=True, template=source,
                            vocab_from=llama_test_material / "models" / "ggml-vocab-qwen2.gguf")
    with lb.Model(path, vocab_only=True) as model, LlamaServer(native_tool("llama-server"), path) as server:
        t = ChatTemplates(model)
        assert t.source == source and t.supports_tools and t.supports_thinking
        for conv, body in CONVERSATIONS.items():
            status, theirs = server.post("/apply-template", body)
            assert status == 200, (conv, theirs)
            assert t.apply_request(copy.deepcopy(body)).prompt == theirs["prompt"], conv
