"""Structured outputs and tool calling with the demo model (SmolLM2-135M-Instruct) on a real
cluster, through the `openai` client the way internal tools use it: `parse` with a pydantic
model, and a tool call round trip (forced, then the tool's result on the next turn).

SmolLM2's template ignores `tools`, so these run in the generic format (tools described in
the system message, calls written as JSON); tests/test_tool_parsing.py covers the native
formats with their real templates.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import served_model
from openai import OpenAI
from pydantic import BaseModel, Field

from appliance.cli.up import LocalCluster

pytestmark = pytest.mark.slow

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the current time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                                     "required": ["city"]}}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def cluster(make_module_cluster: Any, demo_model: Path) -> LocalCluster:
    c = make_module_cluster(demo_model, workers=2)
    c.wait_serving(nodes=2)
    return c


@pytest.fixture(scope="module")
def model_id(cluster: LocalCluster) -> str:
    return served_model(cluster.url)


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=300)


class Colour(str, enum.Enum):
    red = "red"
    white = "white"
    blue = "blue"
    green = "green"


class City(BaseModel):
    # Bounded strings and lists: a 135M model left free can loop inside a string until
    # max_tokens (the grammar keeps the shape, not the model's attention).
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int
    flag_colours: list[Colour] = Field(max_length=4)


def test_parse_with_a_pydantic_model_returns_the_object(client: OpenAI, model_id: str) -> None:
    r = client.beta.chat.completions.parse(
        model=model_id, response_format=City, temperature=0, max_tokens=300,
        messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population and flag colours."}],
    )
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop"
    assert city.name  # the demo model does name the city
    assert all(isinstance(c, Colour) for c in city.flag_colours)


def collect_stream(stream: Any) -> tuple[dict[str, Any], str | None, list[Any]]:
    """The assistant message rebuilt from chat chunks, the finish reason, the tool deltas."""
    content, calls, finish, deltas = "", {}, None, []
    for ch in stream:
        if not ch.choices:
            continue
        c = ch.choices[0]
        finish = c.finish_reason or finish
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            deltas.append(d)
            slot = calls.setdefault(d.index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            if d.id:
                assert slot["id"] is None, "a call's id comes once, in its first delta"
                slot["id"], slot["function"]["name"] = d.id, d.function.name
            slot["function"]["arguments"] += d.function.arguments or ""
    message = {"role": "assistant", "content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}
    return message, finish, deltas


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_call_round_trip(client: OpenAI, model_id: str, stream: bool, choice: str) -> None:
    tool_choice: Any = "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    kw: dict[str, Any] = dict(model=model_id, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=120,
                              parallel_tool_calls=False)
    if stream:
        message, finish, deltas = collect_stream(client.chat.completions.create(messages=QUESTION, stream=True, **kw))
        # OpenAI's shape: the first delta of a call carries its id, type and name with empty
        # arguments; the arguments follow in pieces that carry only the index.
        assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.arguments == ""
        assert len(deltas) > 2 and all(d.id is None and d.function.name is None for d in deltas[1:])
    else:
        r = client.chat.completions.create(messages=QUESTION, **kw)
        message, finish = r.choices[0].message.model_dump(exclude_none=True), r.choices[0].finish_reason
    calls = message["tool_calls"]
    assert len(calls) == 1 and not message.get("content")
    # OpenAI: a forced named function finishes with "stop", a chosen call with "tool_calls".
    assert finish == ("tool_calls" if choice == "required" else "stop")
    call = calls[0]
    assert call["id"].startswith("call_")
    if choice == "named":
        assert call["function"]["name"] == "get_weather"
    params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), params)

    # The next turn carries the call and the tool's result; the template renders both.
    result = "It is 21 degrees Celsius and sunny in Paris, with a light wind from the west."
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": call["id"], "content": result}]
    first = client.chat.completions.create(messages=QUESTION, model=model_id, tools=TOOLS, max_tokens=1, temperature=0)
    follow = client.chat.completions.create(messages=history, model=model_id, tools=TOOLS, max_tokens=1, temperature=0)
    grown = follow.usage.prompt_tokens - first.usage.prompt_tokens  # type: ignore[union-attr]
    assert grown > len(result.split()) + len(call["function"]["arguments"]) // 4
    answer = client.chat.completions.create(messages=history, model=model_id, tools=TOOLS, tool_choice="none",
                                            max_tokens=40, temperature=0, stream=stream)
    if stream:
        message, finish, _ = collect_stream(answer)
        text = message["content"]
        assert not message["tool_calls"]
    else:
        text = answer.choices[0].message.content
        assert not answer.choices[0].message.tool_calls
    assert text and text.strip()


def test_parallel_tool_calls_false_gives_one_call_and_auto_gives_a_valid_reply(client: OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="auto",
                                       parallel_tool_calls=False, temperature=0, max_tokens=150)
    m = r.choices[0].message
    # auto: the model chooses; whatever it chose is well formed
    if m.tool_calls:
        assert len(m.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls"
        fn = m.tool_calls[0].function  # type: ignore[union-attr]
        params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == fn.name)
        jsonschema.validate(json.loads(fn.arguments), params)
    else:
        assert m.content and r.choices[0].finish_reason in ("stop", "length")
