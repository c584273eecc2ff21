"""The malformed-request battery shared by the fake-engine and real-server API tests.

Each case is sent raw (httpx, not the SDK, so broken JSON and wrong types get through)
and must come back with its 4xx status and the OpenAI error envelope.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class BadCase:
    name: str
    path: str
    body: Any = None  # JSON-serialisable; ignored when raw is set
    raw: bytes | None = None
    status: int = 400
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def bad_cases(model: str, vocab_size: int, max_model_len: int, max_body_bytes: int) -> list[BadCase]:
    c, ch = "/v1/completions", "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    ok_c = {"model": model, "prompt": "hi", "max_tokens": 1}
    ok_ch = {"model": model, "messages": msgs, "max_tokens": 1}

    def cp(**kw: Any) -> dict[str, Any]:
        return {**ok_c, **kw}

    def chp(**kw: Any) -> dict[str, Any]:
        return {**ok_ch, **kw}

    return [
        BadCase("broken json", c, raw=b'{"model": "x", "prompt": '),
        BadCase("empty body", c, raw=b""),
        BadCase("json array", c, raw=b"[1, 2, 3]"),
        BadCase("NaN temperature", c, raw=json.dumps(cp()).encode()[:-1] + b', "temperature": NaN}'),
        BadCase("Infinity top_p", ch, raw=json.dumps(chp()).encode()[:-1] + b', "top_p": Infinity}'),
        BadCase("-Infinity penalty", c, raw=json.dumps(cp()).encode()[:-1] + b', "presence_penalty": -Infinity}'),
        BadCase("temperature < 0", c, cp(temperature=-0.5)),
        BadCase("temperature > 2", ch, chp(temperature=2.5)),
        BadCase("temperature string", c, cp(temperature="0.5")),
        BadCase("temperature bool", ch, chp(temperature=True)),
        BadCase("top_p = 0", c, cp(top_p=0)),
        BadCase("top_p > 1", ch, chp(top_p=1.5)),
        BadCase("n = 0", c, cp(n=0)),
        BadCase("n too large", ch, chp(n=1000)),
        BadCase("max_tokens < 0", c, cp(max_tokens=-1)),
        BadCase("max_tokens string", c, cp(max_tokens="ten")),
        BadCase("chat max_tokens 0", ch, chp(max_tokens=0)),
        BadCase("max_completion_tokens float", ch, chp(max_completion_tokens=1.5)),
        BadCase("prompt missing", c, {"model": model, "max_tokens": 1}),
        BadCase("prompt wrong type", c, cp(prompt=123)),
        BadCase("prompt empty list", c, cp(prompt=[])),
        BadCase("prompt token out of vocab", c, cp(prompt=[1, vocab_size + 5])),
        BadCase("messages empty", ch, chp(messages=[])),
        BadCase("messages missing", ch, {"model": model, "max_tokens": 1}),
        BadCase("bad role", ch, chp(messages=[{"role": "robot", "content": "hi"}])),
        BadCase("image content part", ch, chp(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
        BadCase("content wrong type", ch, chp(messages=[{"role": "user", "content": 42}])),
        BadCase("unknown model", c, cp(model="no-such-model"), status=404),
        BadCase("unknown field", c, cp(frobnicate=True)),
        BadCase("too many stops", c, cp(stop=["a", "b", "c", "d", "e"])),
        BadCase("empty stop", ch, chp(stop="")),
        BadCase("logit_bias key not int", c, cp(logit_bias={"abc": 1})),
        BadCase("logit_bias id out of vocab", ch, chp(logit_bias={str(vocab_size + 10): 1})),
        BadCase("logit_bias value > 100", c, cp(logit_bias={"5": 200})),
        BadCase("completions logprobs too big", c, cp(logprobs=50)),
        BadCase("top_logprobs without logprobs", ch, chp(top_logprobs=3)),
        BadCase("top_logprobs too big", ch, chp(logprobs=True, top_logprobs=30)),
        BadCase("presence_penalty > 2", c, cp(presence_penalty=3)),
        BadCase("frequency_penalty < -2", ch, chp(frequency_penalty=-3)),
        BadCase("repetition_penalty 0", c, cp(repetition_penalty=0)),
        BadCase("stream not bool", ch, chp(stream="yes")),
        BadCase("seed too large", c, cp(seed=2**70)),
        BadCase("priority under fcfs", ch, chp(priority=1)),
        BadCase("priority not an int", c, cp(priority="high")),
        BadCase("priority too large", c, cp(priority=2**40)),
        BadCase("tool without function", ch, chp(tools=[{"type": "function"}])),
        BadCase("tool name with spaces", ch, chp(tools=[{"type": "function", "function": {"name": "get weather"}}])),
        BadCase("tool parameters not an object", ch, chp(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}])),
        BadCase("duplicate tool names", ch, chp(tools=[{"type": "function", "function": {"name": "f"}}] * 2)),
        BadCase("tool_choice unknown function", ch, chp(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}})),
        BadCase("tool_choice required without tools", ch, chp(tool_choice="required")),
        BadCase("tool_choice bad string", ch, chp(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="always")),
        BadCase("tool parameters invalid schema", ch, chp(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}], tool_choice="required")),
        BadCase("json_schema response_format without schema", ch, chp(response_format={"type": "json_schema"})),
        BadCase("response_format unknown type", ch, chp(response_format={"type": "yaml"})),
        BadCase("invalid json schema", ch, chp(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}})),
        BadCase("unsupported schema keyword", c, cp(guided_json={"not": {"type": "string"}})),
        BadCase("guided_json not json", c, cp(guided_json="{nope")),
        BadCase("invalid regex", c, cp(guided_regex="a(b")),
        BadCase("empty choice", ch, chp(guided_choice=[])),
        BadCase("invalid grammar", c, cp(guided_grammar="start: (((")),
        BadCase("two constraints", c, cp(guided_regex="a+", guided_choice=["a"])),
        BadCase("structured_outputs unknown key", ch, chp(structured_outputs={"xml": "x"})),
        BadCase("tool_choice with a constraint", ch, chp(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required", guided_regex="a")),
        BadCase("prompt over max_model_len", c, cp(prompt=[5] * (max_model_len + 1))),
        BadCase("max_tokens over max_model_len", ch, chp(max_tokens=max_model_len + 1)),
        BadCase("invalid utf-8", c, raw=b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe", "max_tokens": 1}'),
        BadCase("lone surrogate", c, raw=b'{"model": "' + model.encode() + b'", "prompt": "\\ud800", "max_tokens": 1}'),
        BadCase("oversize body", c, cp(prompt="x" * (max_body_bytes + 10)), status=413),
        BadCase("text/plain body (CORS-simple)", c, cp(), status=415, headers={"Content-Type": "text/plain;charset=UTF-8"}),
        BadCase("form body (CORS-simple)", ch, chp(), status=415, headers={"Content-Type": "application/x-www-form-urlencoded"}),
        BadCase("multipart body (CORS-simple)", "/tokenize", {"prompt": "hi"}, status=415, headers={"Content-Type": "multipart/form-data; boundary=x"}),
        BadCase("json-like media type", c, cp(), status=415, headers={"Content-Type": "application/jsonx"}),
        BadCase("unknown path", "/v1/nope", {}, status=404),
        BadCase("wrong method", c, None, status=405, method="GET"),
        BadCase("detokenize out of vocab", "/detokenize", {"tokens": [vocab_size + 1]}),
        BadCase("tokenize neither prompt nor messages", "/tokenize", {}),
        BadCase("admin mode invalid", "/admin/fusion", {"mode": "sideways"}, headers={"Authorization": "Bearer admin-secret"}),
    ]  # fmt: skip


def send(client: httpx.Client, case: BadCase) -> httpx.Response:
    headers = {"Content-Type": "application/json", **case.headers}
    if case.method == "GET":
        return client.get(case.path, headers=headers)
    content = case.raw if case.raw is not None else json.dumps(case.body).encode()
    return client.post(case.path, content=content, headers=headers)


def assert_error_shape(resp: httpx.Response, status: int, name: str) -> None:
    assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text[:300]}"
    body = resp.json()
    assert set(body) == {"error"}, f"{name}: {body}"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"{name}: {err}"
    assert isinstance(err["message"], str) and err["message"], name
    assert isinstance(err["type"], str) and err["type"], name
    assert "Traceback" not in resp.text and len(resp.text) < 4000, name
