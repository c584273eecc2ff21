"""The engine core in its own process (server/engine/process_client.py), on a tiny random model on the CPU:
same tokens as the in-process engine, aborts free the child's blocks, limits are checked before a
request is queued, metrics and the fusion switch cross the pipe, a dead child fails its streams."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusionserve.server.api.fusion import FusionSwitch
from fusionserve.server.api.metrics import ServerMetrics
from fusionserve.server.contract import (
    EngineConfig,
    EngineDeadError,
    EngineStartError,
    QueueFullError,
    RequestTooLongError,
    SamplingParams,
)
from fusionserve.server.engine.llm_engine import LLMEngine
from fusionserve.server.engine.process_client import ProcessEngineClient
from tests.tiny_models import make_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9] * 20, list(range(3, 40)), [200, 100]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_proc"), arch="llama")


def config(path, **kw) -> EngineConfig:
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("layer_timing_every", 2)
    return EngineConfig(model_dir=str(path), **kw)


@pytest.fixture(scope="module")
def proc(tiny_dir):
    front = ProcessEngineClient(config(tiny_dir, max_queue=8))
    front.start()
    yield front
    front.shutdown()


async def collect(front, rid, prompt, params):
    return [o async for o in front.generate(rid, prompt, params)]


def test_same_tokens_as_the_engine_in_process(proc, tiny_dir):
    want = LLMEngine(config(tiny_dir)).generate(
        PROMPTS, [GREEDY, GREEDY, SamplingParams(max_tokens=6, n=2, temperature=0.9, seed=3), GREEDY]
    )

    async def main():
        params = [GREEDY, GREEDY, SamplingParams(max_tokens=6, n=2, temperature=0.9, seed=3), GREEDY]
        return await asyncio.gather(
            *(collect(proc, f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, params)))
        )

    got = asyncio.run(main())
    for outs, ref in zip(got, want):
        for choice in ref:
            mine = [o for o in outs if o.index == choice.index]
            assert [t for o in mine for t in o.token_ids] == choice.token_ids
            assert mine[-1].finished and mine[-1].finish_reason == "length"
            assert mine[-1].completion_tokens == len(choice.token_ids)
    assert proc.is_alive() and proc.kernel_path.endswith("engine process")


def test_leaving_early_aborts_in_the_child(proc):
    async def main():
        agen = proc.generate("long", [5, 6], LONG)
        assert (await agen.__anext__()).token_ids
        await agen.aclose()
        assert await proc.wait_idle(10)

    asyncio.run(main())
    st = proc.stats()
    assert (st.running, st.waiting, st.free_blocks) == (0, 0, st.num_blocks)


def test_limits_are_checked_before_queueing(proc):
    async def first(params, prompt=(5,)):
        return await proc.generate("bad", list(prompt), params).__anext__()

    with pytest.raises(RequestTooLongError):
        asyncio.run(first(SamplingParams(max_tokens=10**6)))
    with pytest.raises(ValueError, match="token ids"):
        asyncio.run(first(GREEDY, prompt=(10**7,)))
    with pytest.raises(ValueError, match="stop strings"):
        asyncio.run(first(SamplingParams(stop=("x",))))


def test_metrics_and_fusion_cross_the_pipe(proc):
    """The child records no metrics: its StepStats records reach the HTTP process's registry."""
    http = ServerMetrics(
        model_name="tiny", process_metrics=False, engine_cpu_seconds=lambda: proc.cpu_seconds
    )
    fusion = FusionSwitch(proc)  # what /admin/fusion reads
    proc.listeners.append(http.record)

    async def main():
        await collect(proc, "m", [5, 6, 7], GREEDY)
        fusion.set_mode("off")
        assert fusion.mode == proc.fusion_mode == "off"
        await collect(proc, "m2", [5, 6, 7], GREEDY)
        assert await proc.wait_idle(10)
        return fusion.summary()

    try:
        summary = asyncio.run(main())
    finally:
        proc.listeners.remove(http.record)
        proc.listeners.remove(fusion.timings.record_outputs)
    assert summary["mode"] == "off" and {"on", "off"} <= summary["steps"].keys()
    http.set_fusion_mode("off")
    http.count_request("/v1/completions", 200)
    text = http.render()[0].decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    steps = {
        s.labels["fusion"]
        for s in fams["fusionserve_step_latency_seconds"].samples
        if s.name.endswith("_count") and s.value > 0
    }
    assert steps == {"on", "off"}
    assert any(s.value == 1 for s in fams["fusionserve_requests"].samples)  # the HTTP side's own series
    assert fams["fusionserve_engine_process_cpu_seconds"].samples[0].value > 0
    assert {s.labels["mode"]: s.value for s in fams["fusionserve_fusion_mode"].samples}["off"] == 1.0
    assert len([n for n in fams if n == "fusionserve_fusion_mode"]) == 1
    fusion.set_mode("on")


def test_queue_full_counts_requests_the_child_has_not_seen(tiny_dir):
    front = ProcessEngineClient(config(tiny_dir, max_queue=0))
    front.start()
    try:
        with pytest.raises(QueueFullError):
            asyncio.run(front.generate("q", [5], GREEDY).__anext__())
    finally:
        front.shutdown()


def test_shutdown_aborts_and_a_killed_child_fails_its_streams(tiny_dir):
    front = ProcessEngineClient(config(tiny_dir))
    front.start()

    async def main():
        agen = front.generate("k", [5, 6], LONG)
        assert (await agen.__anext__()).token_ids
        os.kill(front._proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass
        with pytest.raises(EngineDeadError):
            await front.generate("after", [5], GREEDY).__anext__()

    asyncio.run(main())
    assert not front.is_alive()
    front.shutdown()

    front = ProcessEngineClient(config(tiny_dir))
    front.start()

    async def drained():
        agen = front.generate("s", [5, 6], LONG)
        assert (await agen.__anext__()).token_ids
        await asyncio.get_running_loop().run_in_executor(None, front.shutdown)
        return [o async for o in agen]

    rest = asyncio.run(drained())
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert front._proc.exitcode == 0 and not front.is_alive()


def test_start_up_failure_is_reported(tiny_dir):
    with pytest.raises(EngineStartError, match="KV cache"):
        ProcessEngineClient(EngineConfig(model_dir=str(tiny_dir), kv_cache_gb=1e-9))


def test_supervised_child_is_respawned_then_given_up(tiny_dir):
    """kill -9 with a stream in flight: the stream fails, the engine serves again (idle gauges, same
    fusion mode); a wedged child (SIGSTOP) is killed and respawned; the third death gives up."""
    from fusionserve.server.engine.supervisor import RestartPolicy

    front = ProcessEngineClient(config(tiny_dir), restart=RestartPolicy(backoff_s=0.05, max_deaths=3))
    gave_up: list[str] = []
    front.on_give_up = gave_up.append
    front.start()

    def wait_serving(timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not front.is_alive():
            assert time.monotonic() < deadline, "the engine was not respawned"
            time.sleep(0.05)

    async def killed_mid_stream(kill) -> None:
        agen = front.generate("k", [5, 6], LONG)
        assert (await agen.__anext__()).token_ids
        kill(front._proc.pid)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass

    try:
        first_pid = front._proc.pid
        asyncio.run(killed_mid_stream(lambda pid: os.kill(pid, signal.SIGKILL)))
        assert not front.is_alive()
        front.set_fusion_mode("off")
        wait_serving()
        assert front._proc.pid != first_pid and front.restarts == 1 and not front.restarting
        outs = asyncio.run(collect(front, "after", [5, 6, 7], GREEDY))
        assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == GREEDY.max_tokens
        assert asyncio.run(front.wait_idle(10))
        st = front.stats()
        assert (st.running, st.waiting, st.free_blocks) == (0, 0, st.num_blocks)
        assert front.fusion_mode == "off"

        front.WEDGED_AFTER_S = 1.0
        asyncio.run(killed_mid_stream(lambda pid: os.kill(pid, signal.SIGSTOP)))
        wait_serving()
        assert front.restarts == 2 and not gave_up

        asyncio.run(killed_mid_stream(lambda pid: os.kill(pid, signal.SIGKILL)))
        deadline = time.monotonic() + 30
        while not gave_up:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "3 times" in gave_up[0] and not front.is_alive()
        with pytest.raises(EngineDeadError):
            asyncio.run(front.generate("late", [5], GREEDY).__anext__())
    finally:
        front.shutdown()


def test_death_log_backoff_window_and_exit_words():
    from fusionserve.server.engine.supervisor import DeathLog, RestartPolicy, describe_exit

    now = [0.0]
    deaths = DeathLog(
        RestartPolicy(max_deaths=3, window_s=600, backoff_s=1, backoff_max_s=1.5), lambda: now[0]
    )
    assert deaths.record() == 1
    now[0] = 10
    assert deaths.record() == 1.5  # doubled, capped
    now[0] = 605  # the first death has left the window: two recent deaths, not three
    assert deaths.record() == 1.5
    now[0] = 606
    assert deaths.record() is None
    assert describe_exit(-9) == "killed by SIGKILL (9)" and describe_exit(1) == "exit status 1"
