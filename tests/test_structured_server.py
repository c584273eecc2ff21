"""Structured output and tool calls end to end: the openai SDK against a real server on the default
model (CPU). Every finished output must validate: JSON schemas (the SDK's `parse` with a pydantic
model, n > 1, seeds, stop strings, streaming), json_object, regex, choice, Lark grammars, and tool
calls for every tool_choice, whole and streamed, with a tool result sent back through the template."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.test_api_server import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 20}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def srv(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(default_model_dir, tmp_path_factory.mktemp("structured") / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def person_prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Invent a person and describe them as JSON."}]


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.beta.chat.completions.parse(
        model=MODEL, messages=person_prompt(), response_format=Person, max_tokens=60, temperature=0
    )
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Person)
    assert Person.model_validate_json(msg.content) == msg.parsed


def test_json_schema_with_n_seeds_and_stop_strings(client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(
        model=MODEL, messages=person_prompt(), response_format=rf, max_tokens=80, n=3, seed=7,
        temperature=1.0, stop=["}", "\n"],
    )  # fmt: skip
    again = client.chat.completions.create(
        model=MODEL, messages=person_prompt(), response_format=rf, max_tokens=80, n=3, seed=7,
        temperature=1.0, stop=["}", "\n"],
    )  # fmt: skip
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    stopped = [c for c in out.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 2
    for c in stopped:  # "}" only ends the output where the JSON is complete
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_streamed_json_schema_and_json_object(client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    text, finish = "", None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=person_prompt(), response_format=rf, max_tokens=80, stream=True, temperature=0
    ):
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    out = client.chat.completions.create(
        model=MODEL,
        messages=person_prompt(),
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # a length finish may leave it unfinished (documented), but never off the grammar
        assert out.choices[0].message.content.startswith("{")


def test_regex_choice_and_grammar_on_both_endpoints(client: openai.OpenAI) -> None:
    rx = r"(yes|no), because [a-z ]{3,30}\."
    out = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=40,
        extra_body={"guided_regex": rx},
        temperature=0,
    )
    assert out.choices[0].finish_reason == "stop" and re.fullmatch(rx, out.choices[0].text)
    choices = ["Paris", "London", "Berlin"]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=10,
        extra_body={"guided_choice": choices}, n=2, temperature=1.0, seed=1,
    )  # fmt: skip
    assert all(c.message.content in choices for c in out.choices)
    lark = 'start: greeting ", " name "!"\ngreeting: "Hello" | "Hi"\nname: /[A-Z][a-z]{1,10}/'
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Greet me."}], max_tokens=20,
        extra_body={"structured_outputs": {"grammar": lark}}, temperature=0,
    )  # fmt: skip
    assert re.fullmatch(r"(Hello|Hi), [A-Z][a-z]{1,10}!", out.choices[0].message.content)


def check_calls(message: Any, allowed: set[str]) -> list[dict[str, Any]]:
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in allowed
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, tool["function"]["parameters"])
        out.append({"name": call.function.name, "arguments": args})
    return out


@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_and_named_tool_choice_validate(client: openai.OpenAI, choice: str) -> None:
    tool_choice: Any = (
        "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    )
    allowed = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=tool_choice, max_tokens=80, temperature=0,
        parallel_tool_calls=False,
    )  # fmt: skip
    c = out.choices[0]
    assert c.finish_reason == "tool_calls" and len(check_calls(c.message, allowed)) == 1


def test_streamed_tool_calls_and_the_round_trip(client: openai.OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish, pieces = None, 0
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        stream=True,
        temperature=0,
    ):
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
            pieces += bool(tc.function and tc.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and sorted(calls) == list(range(len(calls))) and calls  # parallel allowed
    assert pieces > len(calls)  # the arguments arrive in pieces, as OpenAI streams them
    for call in calls.values():
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    call = calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 18, "unit": "c"}'},
    ]  # fmt: skip
    out = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=30, temperature=0
    )
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_and_none(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=60, temperature=0
    )
    c = out.choices[0]
    if c.message.tool_calls:  # free text that parsed as a call: it must be a valid one
        check_calls(c.message, {"get_weather"})
        assert c.finish_reason == "tool_calls"
    else:
        assert c.message.content is not None and c.finish_reason in ("stop", "length")
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20, temperature=0
    )
    assert out.choices[0].message.tool_calls is None
