"""Model output parses back into content, reasoning and tool calls as llama.cpp parses it, for each
output format; streamed in pieces split at every point, the deltas add up to the whole parse."""

from __future__ import annotations

import json

import pytest

import llamabind as lb
from llamabind.chat import ChatMessage, ChatParser, ChatTemplates, ToolCall
from chatoracle import vocab_for
from conftest import TEMPLATES

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "Time",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                          "required": ["tz"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
PARIS = ToolCall("get_weather", '{"city": "Paris"}')
UTC = ToolCall("get_time", '{"tz": "UTC"}')

# (template, model output, expected message); ids are left out of the comparison where the model gives none.
CASES = [
    ("Qwen-Qwen3-0.6B.jinja", "<think>\nlet me see\n</think>\n\nSure.<tool_call>\n"
     '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     ChatMessage("Sure.", "let me see\n", (PARIS,))),
    ("Qwen-Qwen3-0.6B.jinja", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
     "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>",
     ChatMessage("", "", (PARIS, UTC))),
    ("Qwen-Qwen3-0.6B.jinja", "<think>\nhm\n</think>\n\nIt is sunny.", ChatMessage("It is sunny.", "hm\n")),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     ChatMessage("", "", (PARIS,))),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "Paris is sunny today.", ChatMessage("Paris is sunny today.")),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja",
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]',
     ChatMessage("", "", (ToolCall("get_weather", '{"city": "Paris"}', "abcdefghi"),))),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "hmm ok\n</think>\n\nThe answer is 4.",
     ChatMessage("\n\nThe answer is 4.", "\nhmm ok\n")),
    ("openai-gpt-oss-120b.jinja", "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
     "<|message|>Hi there", ChatMessage("Hi there", "think")),
]


@pytest.fixture(scope="module")
def templates(vocab_model, chat_templates_dir):
    loaded: dict[str, ChatTemplates] = {}
    models = []

    def get(name: str) -> ChatTemplates:
        if name not in loaded:
            models.append(lb.Model(vocab_model(vocab_for(name)), vocab_only=True))
            loaded[name] = ChatTemplates(models[-1], (TEMPLATES / name).read_text())
        return loaded[name]

    yield get
    for m in models:
        m.close()


def _without_ids(msg: ChatMessage) -> ChatMessage:
    """``msg`` with its tool-call ids blanked: a stream fixes each call's id when the call first
    shows, before a model-written id is complete (as llama-server does), so it may be generated."""
    return ChatMessage(msg.content, msg.reasoning_content, tuple(ToolCall(c.name, c.arguments) for c in msg.tool_calls))


def _concat(deltas) -> ChatMessage:
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning_content for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.tool_call is not None:
            name, args, cid = calls.setdefault(d.tool_call.index, ["", "", ""])
            calls[d.tool_call.index] = [name + d.tool_call.name, args + d.tool_call.arguments, cid or d.tool_call.id]
    return ChatMessage(content, reasoning, tuple(ToolCall(n, a, i) for n, a, i in (calls[k] for k in sorted(calls))))


@pytest.mark.parametrize("name,output,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_output_parses_to_the_expected_message(templates, name, output, expected):
    prompt = templates(name).apply(ASK, tools=TOOLS)
    assert prompt.parse_tool_calls
    got = ChatParser(prompt).parse(output)
    assert got == expected
    for call in got.tool_calls:
        json.loads(call.arguments)


@pytest.mark.parametrize("name,output,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_at_every_split_point_the_deltas_add_up(templates, name, output, expected):
    prompt = templates(name).apply(ASK, tools=TOOLS)
    for cut in range(len(output) + 1):
        parser = ChatParser(prompt)
        deltas = parser.feed(output[:cut]) + parser.feed(output[cut:]) + parser.finish()
        final = parser.message
        assert _without_ids(final) == _without_ids(expected), cut
        assert _concat(deltas) == final, cut
        assert all(c.id for c in final.tool_calls)  # every call gets an id, fixed once given


def test_streamed_char_by_char_the_deltas_add_up(templates):
    name, output, expected = CASES[0]
    parser = ChatParser(templates(name).apply(ASK, tools=TOOLS))
    deltas = [d for ch in output for d in parser.feed(ch)] + parser.finish()
    assert _without_ids(parser.message) == _without_ids(expected)
    assert _concat(deltas) == parser.message
    kinds = {("tool" if d.tool_call else "reasoning" if d.reasoning_content else "content") for d in deltas}
    assert kinds == {"tool", "reasoning", "content"}
    first_call = next(d.tool_call for d in deltas if d.tool_call)
    assert first_call.name == "get_weather" and first_call.id  # the name and id come before the arguments


def test_output_truncated_mid_call_keeps_what_was_there(templates):
    name, output, _ = CASES[0]
    cut = output.index('"Paris"') + 3
    prompt = templates(name).apply(ASK, tools=TOOLS)
    partial = ChatParser(prompt).parse(output[:cut], partial=True)
    assert partial.content == "Sure." and partial.reasoning_content == "let me see\n"
    assert [c.name for c in partial.tool_calls] == ["get_weather"]
    assert '{"city": "Paris"}'.startswith(partial.tool_calls[0].arguments.rstrip('"}'))
    final = ChatParser(prompt).parse(output[:cut])  # the output ended there: nothing is lost
    assert final.content == "Sure." and [c.name for c in final.tool_calls] == ["get_weather"]


def test_output_that_does_not_fit_the_format_becomes_content(templates):
    prompt = templates("openai-gpt-oss-120b.jinja").apply(ASK, tools=TOOLS)
    text = "no channel markers here at all"
    msg = ChatParser(prompt).parse(text)
    assert msg.content == text and not msg.tool_calls


def test_without_tools_a_tool_shaped_output_stays_content(templates):
    name, output, _ = CASES[1]
    prompt = templates(name).apply(ASK)
    assert not prompt.parse_tool_calls
    msg = ChatParser(prompt).parse(output)
    assert not msg.tool_calls and "get_weather" in msg.content


def test_the_prompt_says_what_sampling_needs(templates):
    qwen = templates("Qwen-Qwen3-0.6B.jinja")
    assert qwen.supports_tools and qwen.supports_thinking and qwen.supports_system_role
    p = qwen.apply(ASK, tools=TOOLS)
    assert p.grammar and p.grammar_lazy and p.grammar_triggers
    assert "<tool_call>" in p.preserved_tokens and "<think>" in p.preserved_tokens
    assert p.enable_thinking
    assert "<think>" not in p.prompt.split("assistant")[-1]
    off = qwen.apply(ASK, enable_thinking=False)
    assert not off.enable_thinking and off.prompt.endswith("<think>\n\n</think>\n\n")
    assert qwen.apply(ASK, tool_choice="none", tools=TOOLS).parse_tool_calls is False


def test_a_finished_parser_refuses_more(templates):
    parser = ChatParser(templates("Qwen-Qwen3-0.6B.jinja").apply(ASK))
    parser.finish("done")
    with pytest.raises(lb.InvalidInputError, match="finished"):
        parser.feed("more")


# Outputs whose content holds pieces of markers, for the streaming tests below (compared with
# llama.cpp's own parse of the same text, so no expected message is written by hand).
TRICKY = [
    ("Qwen-Qwen3-0.6B.jinja", "<think>\nis 2 < 3? yes, </thin is no end\n</think>\n\nUse <tool_ or <b>bold</b>."
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'),
    ("openai-gpt-oss-120b.jinja", "<|channel|>analysis<|message|>a <|en tag<|end|><|start|>assistant<|channel|>final"
     "<|message|>x <| y"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "Braces { and } and <|python_tag but plain text."),
]


def _pieces(text: str, sizes: tuple[int, ...]) -> list[str]:
    out, i, k = [], 0, 0
    while i < len(text):
        out.append(text[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return out


@pytest.mark.parametrize("name,output", [(c[0], c[1]) for c in CASES] + TRICKY,
                         ids=[f"case{i}" for i in range(len(CASES))] + [f"tricky{i}" for i in range(len(TRICKY))])
def test_streamed_message_equals_a_fresh_parse_after_every_piece(templates, name, output):
    """A feed that does not re-parse (it extends the open content or reasoning) leaves the same
    message as llama.cpp's parse of all the text so far; and most feeds do not re-parse."""
    prompt = templates(name).apply(ASK, tools=TOOLS)
    for sizes in ((1,), (3, 1, 4, 1, 5), (7, 2)):
        parser, fresh = ChatParser(prompt), ChatParser(prompt)
        pieces = _pieces(output, sizes)
        text, skipped = "", 0
        for piece in pieces:
            before = parser.reparses
            parser.feed(piece)
            text += piece
            if parser.reparses == before:
                skipped += 1
                assert _without_ids(parser.message) == _without_ids(fresh.parse(text, partial=True)), (sizes, text)
        parser.finish()
        final = parser.message
        assert _without_ids(final) == _without_ids(fresh.parse(output))
        if sizes == (1,) and len(final.content) + len(final.reasoning_content) >= 8:  # text that streams
            assert skipped > 0, name


def test_a_long_stream_reparses_only_near_markers(templates):
    """4,000 tokens of reasoning and content cost a handful of full parses, not 4,000."""
    prompt = templates("Qwen-Qwen3-0.6B.jinja").apply(ASK, tools=TOOLS)
    parser = ChatParser(prompt)
    pieces = ["<think>", "\n"] + ["word "] * 2000 + ["</think>", "\n\n"] + ["more "] * 2000
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    assert parser.reparses < 12
    assert _concat(deltas) == parser.message == ChatParser(prompt).parse("".join(pieces))
