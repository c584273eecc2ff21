"""End to end: the official openai SDK against `python -m fusionserve.server.api.cli serve` (a real uvicorn
process) serving the default model on CPU.

Two server processes for the whole module (model loading dominates on 2 CPU cores):
``srv`` (fusion ab, per-layer timing every step, admin key) for everything, and a
keyed one without admin key that ends with the SIGTERM drain test.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_cases import assert_error_shape, bad_cases, send

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
ADMIN = "admin-secret"
MAX_LEN = 512
MAX_BODY = 200_000
MSGS: Any = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "fusionserve.server.api.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_LEN),
        "--max-body-bytes",
        str(MAX_BODY),
        "--log-level",
        "warning",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server did not become healthy:\n{server.tail()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def srv(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("srv") / "server.log"
    server = start_server(
        default_model_dir,
        log,
        "--fusion",
        "ab",
        "--layer-timing-every",
        "1",
        "--admin-key",
        ADMIN,
        "--max-num-seqs",
        "32",
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(srv: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- the SDK ------------------------------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 5
    assert r.id and r.created and r.system_fingerprint and r.object == "text_completion"


def test_chat_stream_usage_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    assert "Paris" in full.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MSGS,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]


def test_completion_stream_usage_equals_non_stream(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_stop_never_leaks(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0}
    text = client.completions.create(**kw, max_tokens=8).choices[0].text
    assert "Paris" in text
    r = client.completions.create(**kw, max_tokens=8, stop=["Paris", "zzz"])
    assert r.choices[0].text == text[: text.index("Paris")] and r.choices[0].finish_reason == "stop"
    parts = list(client.completions.create(**kw, max_tokens=8, stop="Paris", stream=True))
    assert "".join(c.choices[0].text for c in parts) == r.choices[0].text


def test_seed_determinism_and_n(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": MSGS, "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    a = client.chat.completions.create(**kw, n=3)
    b = client.chat.completions.create(**kw, n=3)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.model_dump() == b.usage.model_dump()
    assert 3 <= a.usage.completion_tokens <= 3 * 8  # a sum over the choices
    assert len({c.message.content for c in a.choices}) > 1  # sampled choices differ


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) >= 2 for t in lp.top_logprobs)
    c = client.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    assert "".join(t.token for t in content) == c.choices[0].message.content


def test_echo_max_tokens_zero(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True)
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 5
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert len(lp.tokens) == 5 and lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])


def test_multi_turn_and_content_parts(client: openai.OpenAI) -> None:
    msgs: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert a.choices[0].message.content and a.usage.prompt_tokens > 20
    parts = [dict(m) for m in msgs]
    parts[-1]["content"] = [{"type": "text", "text": "Another "}, {"type": "text", "text": "one?"}]
    b = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=6, temperature=0)
    assert b.choices[0].message.content == a.choices[0].message.content


def test_async_client(srv: Server) -> None:
    async def go() -> None:
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        kw: dict[str, Any] = {"model": MODEL, "messages": MSGS, "max_tokens": 6, "temperature": 0}
        full, *others = await asyncio.gather(*(ac.chat.completions.create(**kw) for _ in range(4)))
        assert all(o.choices[0].message.content == full.choices[0].message.content for o in others)
        stream = await ac.chat.completions.create(**kw, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == full.choices[0].message.content
        await ac.close()

    asyncio.run(go())


def test_tokenize_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == MAX_LEN
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("Hello world")


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_battery(http: httpx.Client) -> None:
    vocab = 49152  # SmolLM2
    cases = bad_cases(MODEL, vocab, MAX_LEN, MAX_BODY)
    assert len(cases) >= 25
    for case in cases:
        assert_error_shape(send(http, case), case.status, case.name)
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200, (case.name, ok.text)
        assert ok.json()["usage"]["completion_tokens"] == 1


# -- concurrency, disconnects, metrics ------------------------------------------------------------


def test_32_streams_half_disconnect(srv: Server, http: httpx.Client) -> None:
    async def one(c: httpx.AsyncClient, i: int) -> str | None:
        body = {
            "model": MODEL,
            "prompt": f"Story number {i}:",
            "max_tokens": 24 if i % 2 else 200,
            "temperature": 0.8,
            "seed": i,
            "stream": True,
        }
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                if i % 2 == 0 and len(lines) >= 2:
                    return None  # leave early: closes the connection mid-stream
            return lines[-1]

    async def go() -> list[str | None]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(go())
    assert [r for i, r in enumerate(results) if i % 2] == ["data: [DONE]"] * 16
    deadline = time.time() + 20
    while True:
        vals = metric_values(http.get("/metrics").text)
        running = vals[("fusionserve_requests_running", ())]
        kv = vals[("fusionserve_kv_cache_usage_ratio", ())]
        waiting = vals[("fusionserve_requests_waiting", ())]
        if running == kv == waiting == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert (running, waiting, kv) == (0, 0, 0)
    assert vals[("fusionserve_aborts_total", ())] >= 16


def test_non_streaming_disconnect_aborts(srv: Server, http: httpx.Client) -> None:
    """A non-streaming client that gives up must free the engine long before max_tokens is reached."""
    aborts0 = metric_values(http.get("/metrics").text)[("fusionserve_aborts_total", ())]
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=1.5)
    deadline = time.time() + 5
    while time.time() < deadline:
        vals = metric_values(http.get("/metrics").text)
        closed = ("fusionserve_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))
        # The handler records its 499 when it returns, which may be after the engine's abort.
        if (
            vals[("fusionserve_requests_running", ())] == 0
            and vals[("fusionserve_aborts_total", ())] > aborts0
            and closed in vals
        ):
            break
        time.sleep(0.1)
    assert vals[("fusionserve_requests_running", ())] == 0
    assert vals[("fusionserve_kv_cache_usage_ratio", ())] == 0
    assert vals[("fusionserve_aborts_total", ())] == aborts0 + 1
    reqs = vals[("fusionserve_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))]
    assert reqs >= 1


def test_metrics_scrape_has_both_fusion_paths(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    layer = fams["fusionserve_layer_latency_seconds"]
    paths = {s.labels["fusion"] for s in layer.samples if s.name.endswith("_count") and s.value > 0}
    assert paths == {"on", "off"}
    layers = {s.labels["layer"] for s in layer.samples if s.name.endswith("_count")}
    assert len(layers) == 30
    parts = {s.labels["part"] for s in layer.samples}
    assert {"attn", "mlp"} <= parts
    step = fams["fusionserve_step_latency_seconds"]
    assert {s.labels["fusion"] for s in step.samples if s.name.endswith("_count") and s.value > 0} == {
        "on",
        "off",
    }
    reqs = {(s.labels["endpoint"], s.labels["status"]) for s in fams["fusionserve_requests"].samples}
    assert ("/v1/chat/completions", "200") in reqs and ("/v1/completions", "400") in reqs
    mode = {s.labels["mode"]: s.value for s in fams["fusionserve_fusion_mode"].samples}
    assert mode == {"on": 0.0, "off": 0.0, "ab": 1.0}
    for name in ("fusionserve_time_to_first_token_seconds", "fusionserve_inter_token_latency_seconds"):
        assert any(s.name.endswith("_count") and s.value > 0 for s in fams[name].samples)
    # the engine runs in its own process (the default): its CPU beside the HTTP process's
    assert fams["fusionserve_engine_process_cpu_seconds"].samples[0].value > 0
    assert fams["process_cpu_seconds"].samples[0].value > 0


def test_admin_fusion_toggle(http: httpx.Client, client: openai.OpenAI) -> None:
    assert_error_shape(http.get("/admin/fusion"), 401, "missing")
    assert_error_shape(
        http.post("/admin/fusion", json={"mode": "off"}, headers={"Authorization": "Bearer x"}), 401, "wrong"
    )
    assert_error_shape(
        http.get("/admin/fusion", headers={"Authorization": f"Bearer {ADMIN.upper()}"}), 401, "case"
    )
    good = {"Authorization": f"Bearer {ADMIN}"}
    state = http.get("/admin/fusion", headers=good).json()
    assert state["mode"] == "ab" and state["summary"]["steps"].keys() >= {"on", "off"}
    before = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
    for mode in ("off", "on"):
        r = http.post("/admin/fusion", json={"mode": mode}, headers=good)
        assert r.status_code == 200 and r.json()["mode"] == mode
        assert http.get("/admin/fusion", headers=good).json()["mode"] == mode
        again = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
        assert again.choices[0].message.content == before.choices[0].message.content
    vals = metric_values(http.get("/metrics").text)
    assert vals[("fusionserve_fusion_mode", (("mode", "on"),))] == 1.0
    http.post("/admin/fusion", json={"mode": "ab"}, headers=good)


# -- a second server: API key, admin disabled, SIGTERM drain --------------------------------------


def test_api_key_admin_disabled_and_sigterm_drain(default_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        default_model_dir, tmp_path / "keyed.log", "--api-key", "k1", "--shutdown-timeout", "60"
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert_error_shape(c.get("/v1/models"), 401, "no key")
            assert_error_shape(c.get("/v1/models", headers={"Authorization": "Bearer k2"}), 401, "wrong key")
            assert_error_shape(
                c.get("/admin/fusion", headers={"Authorization": "Bearer k1"}), 403, "admin off"
            )
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="k1", max_retries=0)
            assert sdk.models.list().data[0].id == MODEL

            result: dict[str, Any] = {}
            first_chunk = threading.Event()

            def in_flight() -> None:
                stream = sdk.completions.create(
                    model=MODEL,
                    prompt="Count: 1, 2, 3,",
                    max_tokens=48,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                text = []
                for chunk in stream:
                    first_chunk.set()
                    text.extend(ch.text for ch in chunk.choices)
                    if chunk.usage:
                        result["usage"] = chunk.usage
                result["text"] = "".join(text)

            t = threading.Thread(target=in_flight)
            t.start()
            assert first_chunk.wait(60)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                r = c.post(
                    "/v1/completions",
                    json={"prompt": "x", "max_tokens": 1},
                    headers={"Authorization": "Bearer k1"},
                )
                assert_error_shape(r, 503, "draining")
            except httpx.TransportError:
                pass  # the in-flight request may already be done and the listener closed
            t.join(60)
        assert result["usage"].completion_tokens == 48, result
        assert server.proc.wait(60) == 0, server.tail()
    finally:
        stop_server(server)


def test_engine_core_thread_serves_too(default_model_dir: Path, tmp_path: Path) -> None:
    """`--engine-core thread` (the engine loop on a thread of the server process): same answers, the
    engine's series in /metrics without an engine process's, a clean exit on SIGTERM."""
    server = start_server(default_model_dir, tmp_path / "thread.log", "--engine-core", "thread")
    try:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = sdk.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
        )
        assert out.usage.completion_tokens == 6
        text = httpx.get(server.url + "/metrics", timeout=30).text
        vals = metric_values(text)
        assert vals[("fusionserve_generation_tokens_total", (("model", MODEL),))] == 6
        assert "fusionserve_engine_process_cpu_seconds_total" not in text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.tail()
    finally:
        stop_server(server)


def engine_pid(server: Server) -> int:
    """The engine process the server started last, as its log says ('engine process started (pid N)')."""
    found = re.findall(r"engine process started \(pid (\d+)\)", server.log.read_text(errors="replace"))
    assert found, server.tail()
    return int(found[-1])


def stream_lines(url: str, started: threading.Event, out: list[str]) -> None:
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()


def wait_healthy(server: Server, seen: set[str], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = httpx.get(server.url + "/health", timeout=5)
        seen.add(r.json()["status"])
        if r.json()["status"] == "engine_restarting":  # alive for orchestrators: healing, not dead
            assert httpx.get(server.url + "/livez", timeout=5).status_code == 200
        if r.status_code == 200:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"not healthy again within {timeout}s:\n{server.tail()}")


def test_killed_engine_is_respawned_and_the_third_death_exits(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """kill -9 the engine with streams in flight: every stream ends with an error event and [DONE],
    the server answers again within 30 s with idle gauges; the third death exits with status 3."""
    server = start_server(default_model_dir, tmp_path / "supervised.log", "--log-level", "info")
    try:
        outs: list[list[str]] = [[] for _ in range(3)]
        started = [threading.Event() for _ in outs]
        threads = [
            threading.Thread(target=stream_lines, args=(server.url, s, o)) for s, o in zip(started, outs)
        ]
        for t in threads:
            t.start()
        assert all(s.wait(60) for s in started)
        first = engine_pid(server)
        os.kill(first, signal.SIGKILL)
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        for lines in outs:
            assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2], lines[-3:]
        seen: set[str] = set()
        assert wait_healthy(server, seen) < 30
        assert "engine_restarting" in seen
        assert engine_pid(server) != first
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = sdk.completions.create(  # greedy, EOS ignored: exactly 4 tokens (a sample may stop early)
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.completion_tokens == 4
        vals = metric_values(httpx.get(server.url + "/metrics", timeout=30).text)
        assert vals[("fusionserve_engine_restarts_total", ())] == 1
        for gauge in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"):
            assert vals[(f"fusionserve_{gauge}", ())] == 0, gauge
        assert "killed by SIGKILL (9)" in server.log.read_text()

        second = engine_pid(server)
        os.kill(second, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while engine_pid(server) == second:  # /health may still say ok before the death is noticed
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.1)
        wait_healthy(server, seen)
        os.kill(engine_pid(server), signal.SIGKILL)
        try:
            assert server.proc.wait(60) == 3, server.tail()
        except subprocess.TimeoutExpired:
            raise AssertionError(server.tail()) from None
        assert "giving up" in server.log.read_text()
    finally:
        stop_server(server)
