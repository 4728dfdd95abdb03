"""Tool calling without a model: the template families are recognised from real templates,
earlier turns render the way each template wants them, forced calls compile to grammars
llama.cpp accepts, and each family's output is parsed into calls as it streams.

The templates in tests/data/templates are the models' own (copied from llama.cpp's
models/templates); no model of those families is small enough to run here, so what they
would write is given as text, in their documented syntax.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.head import tools as tl
from appliance.head.text import ChatTemplate, Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = tl.Function(
    name="get_weather", description="The weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"]},
)
TIME = tl.Function(name="get_time", description=None, parameters={"type": "object", "properties": {}})
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "abcdefghi", "content": "21 degrees and sunny"},
]


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer(str(tiny_model))


def template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / name).read_text(), bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", tl.ToolFormat.HERMES),
        ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", tl.ToolFormat.HERMES),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", tl.ToolFormat.LLAMA3),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", tl.ToolFormat.MISTRAL),
    ],
)
def test_native_templates_render_tools_calls_and_results(tok: Tokenizer, name: str, fmt: tl.ToolFormat) -> None:
    t = template(name)
    caps = tl.TemplateCaps.detect(t)
    assert caps == tl.TemplateCaps(tools=True, tool_calls=True, tool_responses=True, format=fmt)
    for choice, fn in (("required", None), ("function", "get_time"), ("auto", None)):
        plan = tl.plan(HISTORY, req=tl.ToolRequest(functions=(WEATHER, TIME), choice=choice, name=fn), caps=caps)
        text = t.format_chat(plan.messages, tools=plan.template_tools).text
        assert "The weather in a city" in text  # the tools, described by the template itself
        assert "Paris" in text and "21 degrees and sunny" in text  # the earlier call and its result
        if choice == "auto":
            assert plan.grammar == ""  # free text, parsed for calls
        else:
            assert tok.check_grammar(plan.grammar), plan.grammar


def test_a_template_without_tools_gets_them_in_the_system_message(tok: Tokenizer) -> None:
    caps = tl.TemplateCaps.detect(tok.chat)  # SmolLM2's: it ignores `tools`
    assert caps.format is tl.ToolFormat.GENERIC and not caps.tools
    plan = tl.plan(HISTORY, req=tl.ToolRequest(functions=(WEATHER,), choice="auto"), caps=caps)
    text = tok.format_chat(plan.messages, tools=plan.template_tools).text
    assert "The weather in a city" in text and "`tool_calls`" in text
    assert '"tool_call": {"name": "get_weather"' in text  # the earlier call, as the model would write it
    assert "21 degrees and sunny" in text
    assert tok.check_grammar(plan.grammar)
    none = tl.plan(HISTORY, req=tl.ToolRequest(functions=(WEATHER,), choice="none"), caps=caps)
    assert none.grammar == "" and not none.parse and "The weather in a city" not in tok.format_chat(none.messages).text


def parse(fmt: tl.ToolFormat, text: str, *, chunk: int = 3, **kw: Any) -> tuple[tl.ToolParser, list[tl.Event]]:
    p = tl.ToolParser(fmt, **kw)
    events: list[tl.Event] = []
    for i in range(0, len(text), chunk):
        events += p.feed(text[i : i + chunk])
    return p, events + p.finish()


ARGS = '{"city": "Paris \\"centre\\"", "unit": "c"}'
OUTPUTS = [
    pytest.param(tl.ToolFormat.HERMES, f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', id="hermes"),
    pytest.param(tl.ToolFormat.LLAMA3, f'{{"name": "get_weather", "parameters": {ARGS}}}', id="llama3"),
    pytest.param(tl.ToolFormat.LLAMA3, f'<|python_tag|>{{"name": "get_weather", "parameters": {ARGS}}}', id="llama3-tag"),
    pytest.param(tl.ToolFormat.MISTRAL, f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {ARGS}}}, '
                 '{"name": "get_time", "arguments": {}}]', id="mistral"),
    pytest.param(tl.ToolFormat.GENERIC, f'{{ "tool_calls" : [ {{ "name" : "get_weather", "arguments" : {ARGS} }}, '
                 '{"name": "get_time", "arguments": {}} ] }', id="generic"),
    pytest.param(tl.ToolFormat.GENERIC, f'{{"tool_call": {{"arguments": {ARGS}, "name": "get_weather"}}}}',
                 id="generic-arguments-first"),
]


@pytest.mark.parametrize("fmt, text", OUTPUTS)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_calls_are_parsed_the_same_however_the_text_arrives(fmt: tl.ToolFormat, text: str, chunk: int) -> None:
    p, events = parse(fmt, text, chunk=chunk)
    assert p.calls and p.calls[0].name == "get_weather"
    assert json.loads(p.calls[0].arguments) == {"city": 'Paris "centre"', "unit": "c"}
    if len(p.calls) > 1:
        assert p.calls[1].name == "get_time" and json.loads(p.calls[1].arguments) == {}
    assert p.content == "" and not any(isinstance(e, tl.Content) for e in events)
    # The stream carries the same: one start per call, then its arguments in pieces.
    starts = [e for e in events if isinstance(e, tl.CallStart)]
    assert [(s.index, s.name) for s in starts] == [(i, c.name) for i, c in enumerate(p.calls)]
    for i, c in enumerate(p.calls):
        assert "".join(e.text for e in events if isinstance(e, tl.CallArgs) and e.index == i) == c.arguments


def test_arguments_stream_before_the_call_is_complete() -> None:
    p = tl.ToolParser(tl.ToolFormat.HERMES)
    events = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [type(e) for e in events] == [tl.CallStart, tl.CallArgs] and events[1].text == '{"ci'  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "fmt, text",
    [
        pytest.param(tl.ToolFormat.HERMES, "Just text, with a < and <tool in it.", id="hermes"),
        pytest.param(tl.ToolFormat.HERMES, "Before <tool_call>not json at all", id="hermes-broken-call"),
        pytest.param(tl.ToolFormat.LLAMA3, "  Hello {not a call}", id="llama3"),
        pytest.param(tl.ToolFormat.MISTRAL, "Plain [TOOL answer", id="mistral"),
        pytest.param(tl.ToolFormat.GENERIC, "no JSON here", id="generic"),
    ],
)
def test_text_that_is_not_a_call_is_content_unchanged(fmt: tl.ToolFormat, text: str) -> None:
    p, _ = parse(fmt, text)
    assert not p.calls and p.content == text


def test_generic_response_streams_as_decoded_content() -> None:
    p, events = parse(tl.ToolFormat.GENERIC, '{ "response" : "Hi \\u00e9 \\ud83d\\ude00\\n\\"ok\\"" }', chunk=2)
    assert p.content == 'Hi é 😀\n"ok"' and not p.calls
    assert len([e for e in events if isinstance(e, tl.Content)]) > 1  # streamed, not at the end


def test_content_before_a_call_is_kept_and_extra_calls_are_dropped_when_not_parallel() -> None:
    text = ('Let me check.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    p, _ = parse(tl.ToolFormat.HERMES, text, max_calls=1)
    assert p.content == "Let me check." and [c.name for c in p.calls] == ["get_time"]
