"""HTTP layer against a fake engine served by a real uvicorn (in a thread): fast, no model.

Covers routing, validation, error shapes, auth, streaming format, disconnect aborts,
queue-full mapping and draining without paying for a model on 2 CPU cores; the real
engine is exercised end to end in test_api_server.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from fusionserve.server.api.app import ServerSettings, create_app
from fusionserve.server.api.metrics import ServerMetrics
from tests.api_cases import assert_error_shape, bad_cases, send
from tests.fake_engine import FakeEngine

MAX_BODY = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    def __init__(self, engine: FakeEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.metrics = ServerMetrics(model_name=engine.model_name, process_metrics=False)
        self.app = create_app(engine, settings, metrics=self.metrics)
        self.port = free_port()
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadServer]:
    settings = ServerSettings(api_key=None, admin_key="admin-secret", max_body_bytes=MAX_BODY)
    with ThreadServer(FakeEngine(), settings) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def client(srv: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert client.models.retrieve("fake-model").id == "fake-model"


def test_completion_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model="fake-model", prompt="abc", max_tokens=5, temperature=0)
    assert r.choices[0].text == "hello"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 5 and r.usage.total_tokens == 8
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.system_fingerprint


def test_completion_stream_usage_matches(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "fake-model", "prompt": "abc", "max_tokens": 7, "temperature": 0, "n": 2}
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == {c.index: c.text for c in full.choices}


def test_chat_stream_and_parts(client: openai.OpenAI) -> None:
    msgs: Any = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]}]
    full = client.chat.completions.create(model="fake-model", messages=msgs, max_completion_tokens=5)
    assert full.choices[0].message.content == "hello" and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="fake-model",
        messages=msgs,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_stream_ends_with_done(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_stop_and_logprobs_and_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model="fake-model", prompt="ab", max_tokens=10, temperature=0, stop=["w"])
    assert r.choices[0].text == "hello " and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="fake-model", prompt="ab", max_tokens=2, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["h", "e"] and len(lp.token_logprobs) == 2 and lp.text_offset == [0, 1]
    r = client.completions.create(model="fake-model", prompt="ab", max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == "ab" and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs[0] is None
    c = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert [t.token for t in content] == ["h", "e"] and len(content[0].top_logprobs) == 2


def test_bad_input_battery(http: httpx.Client) -> None:
    cases = bad_cases("fake-model", 259, 512, MAX_BODY)
    assert len(cases) >= 25
    for case in cases:
        assert_error_shape(send(http, case), case.status, case.name)
        ok = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert ok.status_code == 200, (case.name, ok.text)


def test_unknown_keys_in_stream_options_ignored_and_extras_accepted(http: httpx.Client) -> None:
    body = {
        "prompt": "a",
        "max_tokens": 2,
        "user": "u1",
        "top_k": 5,
        "min_p": 0.1,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "whatever": 1},
    }
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_disconnect_non_streaming_aborts(srv: ThreadServer) -> None:
    engine = srv.engine
    before = set(engine.aborted)

    async def go() -> None:
        async with httpx.AsyncClient(base_url=srv.url) as c:
            task = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 400}))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    deadline = time.time() + 5
    while time.time() < deadline and (engine.running or engine.aborted == before):
        time.sleep(0.02)
    assert engine.aborted - before and not engine.running


def test_disconnect_streaming_aborts(srv: ThreadServer) -> None:
    engine = srv.engine
    before = set(engine.aborted)
    with httpx.Client(base_url=srv.url) as c:
        with c.stream(
            "POST", "/v1/completions", json={"prompt": "a", "max_tokens": 400, "stream": True}
        ) as r:
            next(r.iter_lines())
    deadline = time.time() + 5
    while time.time() < deadline and (engine.running or engine.aborted == before):
        time.sleep(0.02)
    assert engine.aborted - before and not engine.running


def test_queue_full_is_503_with_retry_after(srv: ThreadServer, http: httpx.Client) -> None:
    srv.engine.max_queue = 0
    try:
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    finally:
        srv.engine.max_queue = 1000
    assert_error_shape(r, 503, "queue full")
    assert r.headers["retry-after"] == "1"


def test_admin_fusion(http: httpx.Client) -> None:
    good = {"Authorization": "Bearer admin-secret"}
    assert_error_shape(http.get("/admin/fusion"), 401, "no key")
    assert_error_shape(
        http.get("/admin/fusion", headers={"Authorization": "Bearer ADMIN-SECRET"}), 401, "case"
    )
    r = http.post("/admin/fusion", json={"mode": "ab"}, headers=good)
    assert r.status_code == 200 and r.json()["mode"] == "ab"
    g = http.get("/admin/fusion", headers=good).json()
    assert g["mode"] == "ab" and "summary" in g
    http.post("/admin/fusion", json={"mode": "on"}, headers=good)


def test_metrics_and_health(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    text = http.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = fams["fusionserve_requests"]
    labels = {(s.labels["endpoint"], s.labels["status"]) for s in reqs.samples if s.name.endswith("_total")}
    assert ("/v1/completions", "200") in labels and ("/v1/completions", "400") in labels
    assert not any(e not in ("other",) and e.startswith("/v1/nope") for e, _ in labels)


def test_tokenize_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "ab"}).json()
    assert r["tokens"] == [100, 101] and r["count"] == 2
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "ab"
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert r["count"] > 3


def test_api_key_and_drain_and_dead_engine() -> None:
    engine = FakeEngine()
    with ThreadServer(engine, ServerSettings(api_key="k1")) as s, httpx.Client(base_url=s.url) as c:
        assert_error_shape(c.get("/v1/models"), 401, "no key")
        assert_error_shape(c.get("/v1/models", headers={"Authorization": "Bearer k2"}), 401, "wrong key")
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/health").status_code == 200  # not guarded
        assert_error_shape(c.get("/admin/fusion", headers={"Authorization": "Bearer k1"}), 403, "admin off")
        s.app.state.drain.draining = True
        r = c.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer k1"})
        assert_error_shape(r, 503, "draining")
        assert c.get("/health").status_code == 503
        s.app.state.drain.draining = False
        engine.alive = False
        assert c.get("/health").status_code == 503


def test_batch_prompts_and_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(model="fake-model", prompt=["a", "b"], max_tokens=3, n=2, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    r2 = client.completions.create(model="fake-model", prompt=["a", "b"], max_tokens=3, n=2, seed=3)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 12


def test_error_body_is_small_for_huge_input(http: httpx.Client) -> None:
    r = http.post(
        "/v1/completions",
        content=json.dumps({"prompt": "x" * 100_000, "bad": 1}),
        headers={"Content-Type": "application/json"},
    )
    assert_error_shape(r, 400, "huge")


def test_json_with_charset_is_accepted_and_no_cors_headers_by_default(http: httpx.Client) -> None:
    body = json.dumps({"model": "fake-model", "prompt": "hi", "max_tokens": 1})
    origin = {"Origin": "https://evil.example"}
    r = http.post(
        "/v1/completions", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8", **origin}
    )
    assert r.status_code == 200, r.text
    assert "access-control-allow-origin" not in r.headers
    pre = http.options(
        "/v1/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code >= 400 and "access-control-allow-origin" not in pre.headers


def test_allowed_origins_answer_preflights_for_those_origins_only() -> None:
    settings = ServerSettings(allowed_origins=("https://app.example",))
    with ThreadServer(FakeEngine(), settings) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        ask = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        }
        ok = c.options("/v1/chat/completions", headers={"Origin": "https://app.example", **ask})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in ok.headers["access-control-allow-methods"]
        refused = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **ask})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        r = c.post(
            "/v1/completions",
            json={"model": "fake-model", "prompt": "hi", "max_tokens": 1},
            headers={"Origin": "https://app.example"},
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    with ThreadServer(FakeEngine(), ServerSettings(allowed_origins=("*",))) as s:
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "https://any.example"})
        assert r.headers["access-control-allow-origin"] == "*"


def test_priority_needs_the_priority_policy(http: httpx.Client) -> None:
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 1}
    assert http.post("/v1/completions", json={**body, "priority": 0}).status_code == 200
    r = http.post("/v1/completions", json={**body, "priority": -3})
    assert_error_shape(r, 400, "priority under fcfs")
    assert r.json()["error"]["param"] == "priority" and "--scheduling-policy" in r.json()["error"]["message"]
    engine = FakeEngine(scheduling_policy="priority")
    with ThreadServer(engine, ServerSettings()) as s:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        assert httpx.post(s.url + "/v1/chat/completions", json={**chat, "priority": -3}).status_code == 200
        assert httpx.post(s.url + "/v1/completions", json={**body, "priority": 7}).status_code == 200
    assert engine.priorities == [-3, 7]


def test_livez_stays_up_while_the_engine_is_respawned() -> None:
    engine = FakeEngine()
    with ThreadServer(engine, ServerSettings()) as s:
        assert httpx.get(s.url + "/livez").status_code == 200
        engine.alive, engine.restarting = False, True
        assert httpx.get(s.url + "/health").json() == {"status": "engine_restarting"}
        assert httpx.get(s.url + "/livez").status_code == 200
        engine.restarting = False
        r = httpx.get(s.url + "/livez")
        assert r.status_code == 503 and r.json() == {"status": "engine_dead"}
