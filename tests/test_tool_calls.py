"""Tool calls and output constraints without a model: the three output formats parsed whole and
streamed, the prompt a template without tools gets, the grammar of required / named calls (it
admits exactly well-formed calls of the chosen functions), and constraint building and validation."""

from __future__ import annotations

import asyncio
import json

import pytest

from fusionserve.server.api.protocol import ChatCompletionRequest, ProtocolError
from fusionserve.server.api.structured_output import Constraint, GrammarValidator, request_constraint
from fusionserve.server.api.tool_calls import (
    PARSERS,
    StreamedToolCalls,
    detect_parser,
    parse_tool_calls,
    parse_tools,
    resolve_choice,
    template_messages,
    tool_grammar,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
NAMES = {"get_weather", "get_time"}

OUTPUTS = {
    "hermes": 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "get_time", "parameters": {}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]',
}


@pytest.mark.parametrize("parser", PARSERS)
def test_each_format_parses_whole_and_streamed(parser):
    content, calls = parse_tool_calls(OUTPUTS[parser], parser, NAMES)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {}]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert content == ("Sure." if parser == "hermes" else None)
    stream = StreamedToolCalls(parser, NAMES)
    text = OUTPUTS[parser]
    shown, deltas = "", []
    for i in range(0, len(text), 3):
        piece, more = stream.feed(text[i : i + 3])
        shown, deltas = shown + piece, deltas + more
    rest, more, called = stream.finish()
    assert (shown + rest).strip() == (content or "") and called
    streamed = accumulate(deltas + more)
    assert [s["name"] for s in streamed] == ["get_weather", "get_time"]
    assert [json.loads(s["arguments"]) for s in streamed] == [{"city": "Paris"}, {}]
    assert all(s["id"].startswith("call_") for s in streamed)
    assert (
        sum(1 for d in deltas if "arguments" in d["function"] and d["function"]["arguments"]) > 2
    )  # in pieces


def accumulate(deltas: list[dict]) -> list[dict]:
    """The calls an OpenAI client assembles from streamed tool-call deltas."""
    calls: dict[int, dict] = {}
    for d in deltas:
        slot = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
        slot["id"] += d.get("id", "")
        slot["name"] += d["function"].get("name", "")
        slot["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("parser", PARSERS)
def test_prose_stays_content_and_made_up_functions_are_dropped(parser):
    text = "The weather is nice."
    assert parse_tool_calls(text, parser, NAMES) == (text, [])
    stream = StreamedToolCalls(parser, NAMES)
    fed = [stream.feed(ch) for ch in text]
    rest, more, called = stream.finish()
    assert "".join(c for c, _ in fed) + rest == text and not called
    assert [d for _, ds in fed for d in ds] + more == []
    made_up = OUTPUTS[parser].replace("get_time", "launch_rockets")
    _, calls = parse_tool_calls(made_up, parser, NAMES)
    assert [c.name for c in calls] == ["get_weather"]
    stream = StreamedToolCalls(parser, NAMES)
    deltas = [d for ch in made_up for d in stream.feed(ch)[1]]
    _, more, called = stream.finish()
    assert called and [c["name"] for c in accumulate(deltas + more)] == ["get_weather"]


def test_detect_parser_from_the_template():
    assert detect_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_parser("[TOOL_CALLS] {{ tools }}") == "mistral"
    assert detect_parser("<|python_tag|>{{ x }}") == "llama3_json"
    assert detect_parser(None) == "hermes"


def test_template_without_tools_gets_the_default_prompt_and_text_turns():
    tools = parse_tools([WEATHER, TIME])
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
    ]  # fmt: skip
    out, extra = template_messages(msgs, tools, "hermes", "{{ messages }}")
    assert extra == {} and out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    }
    assert out[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
    same, extra = template_messages(msgs, tools, "hermes", "{% for t in tools %}{% endfor %}")
    assert same == msgs and [t["function"]["name"] for t in extra["tools"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("parser", PARSERS)
def test_required_grammar_admits_exactly_calls_of_the_chosen_functions(parser, tokenizer_json):
    import llguidance

    tools = parse_tools([WEATHER, TIME])
    tok = llguidance.LLTokenizer(str(tokenizer_json))

    def accepts(grammar: str, text: str) -> bool:
        m = llguidance.LLMatcher(tok, grammar, log_level=0)
        return m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting()

    one = {"hermes": '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
           "llama3_json": '{"name": "get_weather", "parameters": {"city": "Rome"}}',
           "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'}[parser]  # fmt: skip
    required = tool_grammar(tools, "required", True, parser)
    assert accepts(required, one)
    assert not accepts(required, one.replace('"city": "Rome"', '"town": "Rome"'))  # schema enforced
    assert not accepts(required, one.replace("get_weather", "get_wether"))
    assert not accepts(required, "Sure, here you go.")
    named = tool_grammar(tools, "get_time", False, parser)
    assert not accepts(named, one)
    assert accepts(named, one.replace("get_weather", "get_time").replace('{"city": "Rome"}', "{}"))


def test_tool_and_choice_shapes():
    assert resolve_choice(None, []) == "none" and resolve_choice(None, parse_tools([TIME])) == "auto"
    assert (
        resolve_choice({"type": "function", "function": {"name": "get_time"}}, parse_tools([TIME]))
        == "get_time"
    )
    for bad in ("always", {"type": "function"}, {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(ProtocolError) as e:
            resolve_choice(bad, parse_tools([TIME]))
        assert e.value.param == "tool_choice"


def chat(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw})


def test_constraint_sources_and_their_params():
    got = request_constraint(
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "object"}},
            }
        )
    )
    assert got.param == "response_format" and got.kind == "json"
    assert request_constraint(chat(response_format={"type": "text"})) is None
    assert request_constraint(chat(guided_choice=["a", "b"])).kind == "choice"
    assert request_constraint(chat(structured_outputs={"regex": "a+"})).param == "structured_outputs.regex"
    assert request_constraint(chat(structured_outputs={"json_object": True})).kind == "json_object"
    compact = request_constraint(chat(guided_json={"type": "object"})).grammar
    spaced = request_constraint(
        chat(guided_json={"type": "object"}, guided_whitespace_pattern=r"[ \n]*")
    ).grammar
    assert compact != spaced and "whitespace_flexible" in spaced
    with pytest.raises(ProtocolError) as e:
        request_constraint(chat(guided_regex="a", response_format={"type": "json_object"}))
    assert "only one" in e.value.message


def test_validation_is_cached_bounded_in_time_and_names_the_param(tokenizer_json):
    v = GrammarValidator(tokenizer_json, 49152)
    bad = request_constraint(chat(guided_regex="a(b"))
    with pytest.raises(ProtocolError) as e:
        asyncio.run(v.check(bad))
    assert e.value.param == "guided_regex" and "unclosed group" in e.value.message
    good = request_constraint(chat(guided_json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    asyncio.run(v.check(good))
    assert good.grammar in v._verdicts
    slow = GrammarValidator(tokenizer_json, 49152, timeout_s=1e-6)
    big = {
        "type": "object",
        "properties": {f"k{i}": {"type": "string", "pattern": f"[a-z]{{{i},{i + 40}}}"} for i in range(60)},
    }
    with pytest.raises(ProtocolError) as e:
        asyncio.run(
            slow.check(Constraint(request_constraint(chat(guided_json=big)).grammar, "guided_json", "json"))
        )
    assert "did not compile within" in e.value.message and e.value.param == "guided_json"


@pytest.fixture(scope="module")
def tokenizer_json(default_model_dir):
    return default_model_dir / "tokenizer.json"
