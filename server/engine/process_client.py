"""The engine core in its own process, so that the GPU loop and the HTTP server stop sharing one GIL.

Why: in one process the engine thread (schedule, launch, per-token bookkeeping) and the asyncio
thread (one SSE chunk per token per stream) take turns on one GIL. At 256 streams of an 8B model
on an H100 the engine waited ~40% of the time for it and the GPU idled between decode steps
(24 ms per step for 14.6 ms of GPU work). Here `LLMEngine` runs in a spawned child (CUDA does not
survive fork) and talks to the HTTP process over two one-way pipes:

- ops in, in order: ``add``, ``abort``, ``fusion`` (mode), ``call`` (a reply is due), ``stop``;
- out: one ``out`` message per engine step (that step's deltas + the engine's stats), ``reply``
  for calls, ``dead`` when the loop crashed, ``bye`` after ``stop``.

The child owns the model, the KV cache, the detokenizers and the engine-side Prometheus series;
``GET /metrics`` collects those over the pipe and merges them with the HTTP process's own
(`collect_metrics`). The child's CPU shows as ``fusionserve_engine_process_*``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing as mp
import queue
import signal
import sys
import threading
import time
from collections.abc import Awaitable
from typing import Any

from fusionserve.server.engine.fusion import FusionControl
from fusionserve.server.engine.llm_engine import (
    EngineConfig,
    EngineDeadError,
    EngineError,
    EngineStats,
    QueueFullError,
    SamplingParams,
    StreamFront,
    check_request,
    load_tokenizer,
)

log = logging.getLogger("fusionserve.engine")

CALL_TIMEOUT_S = 10.0  # a call waits for the step in progress (a long prefill, a first compile)
IDLE_BEAT_S = 0.5  # an idle core still reports its stats this often


class EngineStartError(EngineError):
    """The engine process could not load the model or size its cache (bad configuration)."""


@dataclasses.dataclass(frozen=True)
class CoreInfo:
    """What the HTTP process needs to know about the engine the child built."""

    model_name: str
    max_model_len: int
    kernel_path: str
    vocab_size: int
    has_tokenizer: bool
    stats: EngineStats


# -- the child ----------------------------------------------------------------------------------


def core_main(config: EngineConfig, ops: Any, out: Any, switch_ms: float, log_level: str) -> None:
    """Entry point of the engine process: build the engine, report, then serve ops until ``stop``."""
    # The parent decides when the engine stops (ops / pipe EOF); Ctrl-C on the terminal reaches the
    # whole process group and must not kill the core under requests still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if switch_ms > 0:
        sys.setswitchinterval(switch_ms / 1e3)
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        from fusionserve.server.api.metrics import ServerMetrics
        from fusionserve.server.engine.llm_engine import LLMEngine

        metrics = ServerMetrics(
            model_name=config.served_model_name or "model", fusion_mode=config.fusion, process_metrics=False,
            engine_process=True,
        )  # fmt: skip
        engine = LLMEngine(config, metrics)
    except BaseException as exc:  # noqa: BLE001 - whatever stops the start-up goes to the parent
        out.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    info = CoreInfo(
        engine.model_name, engine.max_model_len, engine.kernel_path, engine.vocab_size,
        engine.tokenizer is not None, engine.stats(),
    )  # fmt: skip
    try:
        out.send(("ready", info))
    except OSError:  # the HTTP process went away while the model loaded
        return
    _Core(engine, metrics, ops, out).run()


class _Core:
    """The child's loop: apply every queued op, run one step, send its outputs in one message."""

    def __init__(self, engine: Any, metrics: Any, ops: Any, out: Any) -> None:
        self.engine = engine
        self.metrics = metrics
        self.ops = ops
        self.out = out
        self.adds = 0  # add ops seen: the parent's queue-full check counts those not seen yet
        self.pending: list[tuple[str, Any]] = []
        self.stopping = False

    def run(self) -> None:
        eng = self.engine
        try:
            last_sent = 0.0
            while not self.stopping:
                busy = eng.has_unfinished()
                if self.ops.poll(0 if busy else IDLE_BEAT_S):
                    self._apply_ops()
                    eng.update_gauges()
                if eng.has_unfinished() and not self.stopping:
                    self.pending.extend((o.request_id, o) for o in eng.step())
                if self.pending or busy or time.monotonic() - last_sent >= IDLE_BEAT_S:
                    self._send_outputs()
                    last_sent = time.monotonic()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return  # the HTTP process is gone: nobody to serve
        except BaseException as exc:  # noqa: BLE001 - the parent must learn why its engine died
            log.exception("engine loop died")
            try:
                self.out.send(("dead", f"{type(exc).__name__}: {exc}"))
            except OSError:
                pass
            raise
        for rid in list(eng.requests):  # stop: whatever still runs ends with 'abort'
            self.pending.extend((o.request_id, o) for o in eng.abort_request(rid))
        self._send_outputs()
        self.out.send(("bye",))

    def _send_outputs(self) -> None:
        self.out.send(("out", self.pending, self.engine.stats(), self.adds))
        self.pending = []

    def _apply_ops(self) -> None:
        eng = self.engine
        while not self.stopping and self.ops.poll():
            op = self.ops.recv()
            kind = op[0]
            if kind == "add":
                _, rid, prompt, params, arrival = op
                self.adds += 1
                try:
                    eng.add_request(rid, prompt, params, arrival)
                except Exception as exc:  # checked in the parent already; a duplicate id lands here
                    self.pending.append((rid, exc))
            elif kind == "abort":
                self.pending.extend((o.request_id, o) for o in eng.abort_request(op[1]))
            elif kind == "fusion":
                eng.fusion.set_mode(op[1])
            elif kind == "call":
                self._answer(op[1], op[2])
            elif kind == "stop":
                self.stopping = True

    def _answer(self, call_id: int, name: str) -> None:
        try:
            if name == "metrics":
                self.engine.update_gauges()
                value: Any = self.metrics.engine_families()
            elif name == "fusion_summary":
                value = self.engine.fusion.summary()
            else:
                raise ValueError(f"unknown call {name!r}")
            self.out.send(("reply", call_id, True, value))
        except Exception as exc:  # noqa: BLE001 - the caller gets the error, the loop goes on
            self.out.send(("reply", call_id, False, f"{type(exc).__name__}: {exc}"))


# -- the HTTP process's side --------------------------------------------------------------------


class _RemoteFusion:
    """`engine.fusion` for the app: the mode is set in the child (its steps pick the path), the
    per-path summary comes from there too (awaitable: it waits for the step in progress)."""

    def __init__(self, front: EngineProcess, mode: str) -> None:
        self._front = front
        self._mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        FusionControl._check(mode)
        self._mode = mode
        self._front._send(("fusion", mode))

    def summary(self) -> Awaitable[dict]:
        return self._front.call("fusion_summary")


class EngineProcess(StreamFront):
    """The asyncio front of an engine running in a child process (server/CONTRACT.md).

    Same surface as AsyncEngine: `generate`, `abort`, `stats`, `is_alive`, `begin_drain`,
    `wait_idle`, `shutdown`, `tokenizer`, `model_name`, `max_model_len`, `kernel_path`, `fusion`;
    plus `collect_metrics()` for /metrics. Requests are checked here (limits from the child) so a
    bad one fails before its response starts; a pipe reader thread feeds the consumers' queues.
    """

    WEDGED_AFTER_S = 120.0  # no message for this long while requests wait counts as wedged

    def __init__(
        self,
        config: EngineConfig,
        *,
        switch_ms: float = 0.0,
        log_level: str = "info",
        start_timeout_s: float = 3600.0,
    ) -> None:
        super().__init__(config)
        from fusionserve.models.registry import resolve_model

        model_dir = resolve_model(config.model_dir)  # converts the default GGUF once, here
        config = dataclasses.replace(
            config, model_dir=str(model_dir), served_model_name=config.served_model_name or model_dir.name
        )
        self.config = config
        ctx = mp.get_context("spawn")
        ops_child, self._ops = ctx.Pipe(duplex=False)
        self._out, out_child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=core_main, args=(config, ops_child, out_child, switch_ms, log_level),
            name="fusionserve-engine", daemon=True,
        )  # fmt: skip
        self._proc.start()
        ops_child.close()
        out_child.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.tokenizer = load_tokenizer(model_dir)  # while the child loads the weights
        info = self._wait_ready(start_timeout_s)
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        self.kernel_path = info.kernel_path + ", engine process"
        self.vocab_size = info.vocab_size
        self._has_tokenizer = info.has_tokenizer
        self._stats = info.stats
        self._adds_sent = self._adds_seen = 0
        self._last_msg = time.monotonic()
        self._stopping = False
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self.fusion = _RemoteFusion(self, config.fusion)
        self._reader = threading.Thread(target=self._read, name="fusionserve-engine-pipe", daemon=True)
        self._sender = threading.Thread(target=self._write, name="fusionserve-engine-ops", daemon=True)

    def _wait_ready(self, timeout_s: float) -> CoreInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._out.poll(0.5):
                try:
                    msg = self._out.recv()
                except EOFError:
                    break
                if msg[0] == "ready":
                    return msg[1]
                self._proc.join(10)
                raise EngineStartError(msg[1])
            if not self._proc.is_alive():
                break
        self._kill()
        code = self._proc.exitcode
        raise EngineStartError(
            f"the engine process exited during start-up (exit code {code})"
            if code is not None
            else f"the engine process did not start within {timeout_s:.0f}s"
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if not self._reader.is_alive() and not self._stopping:
            self._reader.start()
            self._sender.start()

    def _engine_running(self) -> bool:
        return not self._stopping and self._proc.is_alive()

    def is_alive(self) -> bool:
        if self._error is not None or not self._engine_running() or not self._reader.is_alive():
            return False
        return not self._has_streams() or time.monotonic() - self._last_msg < self.WEDGED_AFTER_S

    def stats(self) -> EngineStats:
        return self._stats

    def _idle(self) -> bool:
        st = self._stats  # as of the child's last message (every step, or every 0.5 s when idle)
        return not self._has_streams() and st.running == 0 and st.waiting == 0

    def shutdown(self) -> None:
        """Stop the child; every request still in flight finishes with 'abort'."""
        self._draining = True
        if not self._stopping:
            self._stopping = True
            if self._sender.is_alive():
                self._send(("stop",))
            else:  # never started
                try:
                    self._ops.send(("stop",))
                except OSError:
                    pass
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout=30)
        self._proc.join(timeout=10)
        self._kill()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    # -- requests --------------------------------------------------------------------

    def _send(self, op: tuple) -> None:
        """Queue an op for the child. A pipe write blocks while the child is inside a step and the
        pipe is full (500 prompts arriving at once are ~1 MB of ops): the sender thread waits
        then, never the event loop."""
        self._outbox.put(op)

    def _admit(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, self.vocab_size, self.max_model_len, self._has_tokenizer)
        if self._stats.waiting + (self._adds_sent - self._adds_seen) >= self.config.max_queue:
            raise QueueFullError(f"{self.config.max_queue} requests are already waiting")

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float) -> None:
        self._adds_sent += 1
        self._send(("add", request_id, prompt_ids, params, arrival))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    # -- calls -----------------------------------------------------------------------

    async def call(self, name: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Ask the child for something (answered between two steps)."""
        if not self.is_alive():
            raise EngineDeadError("engine is stopped")
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        fut: asyncio.Future = loop.create_future()
        self._calls[call_id] = (loop, fut)
        try:
            self._send(("call", call_id, name))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(call_id, None)

    async def collect_metrics(self) -> list:
        """The engine's metric families for /metrics ([] when the engine cannot answer now)."""
        try:
            return await self.call("metrics")
        except (EngineError, OSError, asyncio.TimeoutError) as exc:
            log.warning("engine metrics unavailable: %s", exc)
            return []

    def _resolve(self, call_id: int, ok: bool, value: Any) -> None:
        entry = self._calls.get(call_id)
        if entry is None:  # timed out already
            return
        loop, fut = entry

        def settle() -> None:
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(EngineError(value))

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    # -- the pipe threads -------------------------------------------------------------

    def _write(self) -> None:
        while True:
            op = self._outbox.get()
            try:
                self._ops.send(op)
            except OSError:  # the child is gone; the reader reports it
                return
            if op[0] == "stop":
                return

    def _read(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                msg = self._out.recv()
                self._last_msg = time.monotonic()
                kind = msg[0]
                if kind == "out":
                    _, items, self._stats, self._adds_seen = msg
                    if items:
                        self._deliver_all(items)
                elif kind == "reply":
                    self._resolve(*msg[1:])
                elif kind == "dead":
                    reason = f"engine loop died: {msg[1]}"
                    break
                elif kind == "bye":
                    return
        except (EOFError, OSError):
            pass
        finally:
            for call_id in list(self._calls):
                self._resolve(call_id, False, reason)
        if not self._stopping:
            log.error("%s", reason)
        self._error = EngineDeadError(reason)
        self._fail_all(self._error)
