"""The engine-core loop on its own (server/engine/core.py), fed typed ops through an OpQueue as the thread
placement feeds it (the process placement feeds the same loop from a pipe): ops apply in order, every
turn emits one EngineCoreOutputs, STOP aborts what runs and says STOPPED, a crash says DEAD."""

from __future__ import annotations

import threading
import time

import pytest

from fusionserve.models.decoder import Decoder
from fusionserve.server.contract import (
    CoreEvent,
    CoreEventKind,
    CoreOp,
    EngineConfig,
    EngineCoreOutputs,
    EngineCoreRequest,
    OpKind,
    RequestOutput,
    SamplingParams,
)
from fusionserve.server.engine.core import EngineCore, core_info
from fusionserve.server.engine.llm_engine import LLMEngine
from fusionserve.server.engine.thread_client import OpQueue
from tests.tiny_models import make_tiny_checkpoint

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_core"), arch="llama")
    decoder = Decoder.from_pretrained(path, progress=False)

    def make(**kw) -> LLMEngine:
        kw.setdefault("num_kv_blocks", 64)
        kw.setdefault("layer_timing_every", 1)
        return LLMEngine(EngineConfig(model_dir=str(path), **kw), decoder=decoder)

    return make


def add(rid: str, params: SamplingParams, prompt=(5, 6, 7)) -> CoreOp:
    return CoreOp(OpKind.ADD, EngineCoreRequest(rid, list(prompt), params, time.monotonic()))


class Recorder:
    """The `emit` side: every message the core sends, in order."""

    def __init__(self) -> None:
        self.messages: list[EngineCoreOutputs | CoreEvent] = []
        self.lock = threading.Lock()

    def __call__(self, msg: EngineCoreOutputs | CoreEvent) -> None:
        with self.lock:
            self.messages.append(msg)

    def outputs(self) -> list[RequestOutput]:
        with self.lock:
            msgs = [m for m in self.messages if isinstance(m, EngineCoreOutputs)]
        return [o for m in msgs for o in m.outputs if isinstance(o, RequestOutput)]

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return
            time.sleep(0.01)
        raise AssertionError("the core did not get there in time")


def test_ops_apply_in_order_and_stop_aborts_what_runs(engine_factory):
    engine = engine_factory()
    ops, rec = OpQueue(), Recorder()
    core = EngineCore(engine, ops, rec)
    thread = threading.Thread(target=core.run)
    thread.start()
    ops.put(add("short", SHORT))
    ops.put(add("long", LONG))
    rec.wait_for(lambda r: any(o.request_id == "short" and o.finished for o in r.outputs()))
    ops.put(CoreOp(OpKind.SET_FUSION, "off"))  # the steps after it take the unfused path
    rec.wait_for(
        lambda r: any(
            p == "off"
            for m in r.messages
            if isinstance(m, EngineCoreOutputs)
            for _, p, _ in m.step_stats.steps
        )
    )
    assert engine.fusion.mode == "off"
    ops.put(add("long", SHORT, prompt=(9,)))  # an id that is still running: refused, not a crash
    ops.put(CoreOp(OpKind.ABORT, "nobody"))  # aborting an unknown id is a no-op
    ops.put(CoreOp(OpKind.STOP))
    thread.join(30)
    assert not thread.is_alive()

    assert rec.messages[-1] == CoreEvent(CoreEventKind.STOPPED)
    outs = [m for m in rec.messages if isinstance(m, EngineCoreOutputs)]
    assert outs[-1].adds_seen == 3 and outs[-1].stats.running == 0 and outs[-1].stats.waiting == 0
    short = [o for o in rec.outputs() if o.request_id == "short"]
    assert sum(len(o.token_ids) for o in short) == 3 and short[-1].finish_reason == "length"
    longs = [o for o in rec.outputs() if o.request_id == "long"]
    assert longs[-1].finished and longs[-1].finish_reason == "abort"
    refused = [o for m in outs for o in m.outputs if isinstance(o, tuple)]
    assert len(refused) == 1 and refused[0][0] == "long" and isinstance(refused[0][1], ValueError)
    # What the engine measured travelled with the outputs: steps on both paths, per-layer timings, TTFT.
    steps = {path for m in outs for _, path, _ in m.step_stats.steps}
    assert steps == {"on", "off"}
    assert any(m.step_stats.layers for m in outs) and any(m.step_stats.ttfts for m in outs)
    assert sum(m.step_stats.aborts for m in outs) == 1
    assert engine.blocks.check_all_free()


def test_an_idle_core_still_reports(engine_factory):
    ops, rec = OpQueue(), Recorder()
    core = EngineCore(engine_factory(), ops, rec)
    thread = threading.Thread(target=core.run)
    thread.start()
    rec.wait_for(lambda r: len(r.messages) >= 2, timeout=5)  # every IDLE_BEAT_S with nothing to do
    ops.put(CoreOp(OpKind.STOP))
    thread.join(10)
    assert all(isinstance(m, EngineCoreOutputs) and not m.outputs for m in rec.messages[:-1])


def test_a_crashing_step_says_dead_and_raises(engine_factory, monkeypatch):
    engine = engine_factory()
    ops, rec = OpQueue(), Recorder()

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(engine, "step", broken_step)
    ops.put(add("x", SHORT))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        EngineCore(engine, ops, rec).run()
    assert rec.messages[-1].kind is CoreEventKind.DEAD and "illegal memory access" in rec.messages[-1].reason


def test_core_info_is_what_a_client_needs(engine_factory):
    info = core_info(engine_factory(max_model_len=64))
    assert info.limits.max_model_len == 64 and info.limits.vocab_size > 0 and not info.limits.has_tokenizer
    assert info.kernel_path == "torch on cpu" and info.stats.running == 0
    with pytest.raises(ValueError, match="stop strings"):
        info.limits.check([5], SamplingParams(stop=("x",)))
