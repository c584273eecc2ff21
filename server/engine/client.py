"""What the HTTP process holds of the engine: an `EngineClient` (torch-free).

A request's deltas reach its consumer through an asyncio queue that another thread fills (the
core's thread, or the pipe reader of the process placement), with one event-loop wake-up per
step. Requests are checked here against the core's `EngineLimits` before they are queued, so a
bad one fails before its response starts. Each EngineCoreOutputs also carries the step's
StepStats, handed to `listeners` (the server's Prometheus series, /admin/fusion's timings).
Subclasses say how ops travel (`_send`) and whether the core still runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fusionserve.server.contract import (
    CoreEvent,
    CoreEventKind,
    CoreInfo,
    CoreOp,
    EngineConfig,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDeadError,
    EngineShuttingDownError,
    EngineStats,
    OpKind,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from fusionserve.server.engine.fusion import check_mode

OutputsListener = Callable[[EngineCoreOutputs], None]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class EngineClient:
    """The asyncio front of an engine core: `generate`, `abort`, `stats`, `is_alive`,
    `begin_drain`, `wait_idle`, `shutdown`, plus what the core told it when ready."""

    WEDGED_AFTER_S = 120.0  # no message for this long while requests wait counts as wedged

    def __init__(self, config: EngineConfig, tokenizer: object | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.listeners: list[OutputsListener] = []
        self.fusion_mode = config.fusion
        self.scheduling_policy = config.scheduling_policy
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._error: BaseException | None = None
        self._adds_sent = self._adds_seen = 0
        self.cpu_seconds = 0.0  # the core's process CPU time, as of its last message
        self.restarts = 0  # engine respawns (fusionserve_engine_restarts_total)
        self.restarting = False  # a dead core is being replaced: /health says so
        #: Called (from any thread) when the engine is dead for good: the server exits non-zero.
        self.on_give_up: Callable[[str], None] | None = None

    def _ready(self, info: CoreInfo) -> None:
        self.model_name = info.model_name
        self.kernel_path = info.kernel_path
        self.limits = info.limits
        self.max_model_len = info.limits.max_model_len
        self.max_model_len_why = info.max_model_len_why
        self._stats: EngineStats = info.stats
        self._last_msg = time.monotonic()  # READY is the core's first message

    # -- what subclasses provide ------------------------------------------------------

    def _send(self, op: CoreOp) -> None:
        raise NotImplementedError

    def _engine_running(self) -> bool:
        raise NotImplementedError

    # -- state -----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """As of the core's last message (every step, or every IDLE_BEAT_S when idle)."""
        return self._stats

    def begin_drain(self) -> None:
        self._draining = True

    def _has_streams(self) -> bool:
        with self._lock:
            return bool(self._streams)

    def _responsive(self) -> bool:
        """Not wedged: the core has sent something recently, or nobody is waiting for it."""
        return not self._has_streams() or time.monotonic() - self._last_msg < self.WEDGED_AFTER_S

    def _idle(self) -> bool:
        st = self._stats
        return (
            not self._has_streams()
            and st.running == 0
            and st.waiting == 0
            and self._adds_sent == self._adds_seen
        )

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight (within `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle():
                return True
            await asyncio.sleep(0.02)
        return False

    # -- requests --------------------------------------------------------------------

    def _give_up_with(self, reason: str) -> None:
        if self.on_give_up is not None:
            self.on_give_up(reason)

    def _check_accepting(self) -> None:
        if self.restarting:
            raise EngineDeadError("the engine is restarting after a failure; retry shortly")
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error}")
        if not self._engine_running():
            raise EngineDeadError("engine is stopped")
        if self._draining:
            raise EngineShuttingDownError("server is shutting down")

    def _admit(self, prompt_ids: list[int], params: SamplingParams, priority: int) -> None:
        """Raise for a request this engine cannot take now (bad input, too long, queue full)."""
        self.limits.check(prompt_ids, params)
        if priority and self.scheduling_policy != "priority":
            raise ValueError("priority is only honoured with --scheduling-policy priority")
        if self._stats.waiting + (self._adds_sent - self._adds_seen) >= self.config.max_queue:
            raise QueueFullError(f"{self.config.max_queue} requests are already waiting")

    def set_fusion_mode(self, mode: str) -> None:
        """The core's next step takes this path (on / off / ab)."""
        self.fusion_mode = check_mode(mode)
        self._send(CoreOp(OpKind.SET_FUSION, mode))

    def abort(self, request_id: str) -> None:
        self._send(CoreOp(OpKind.ABORT, request_id))

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request; leaving the iteration early aborts it and frees its blocks."""
        self._check_accepting()
        prompt_ids = [int(t) for t in prompt_ids]
        self._admit(prompt_ids, params, priority)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
        finished: set[int] = set()
        try:
            self._adds_sent += 1
            self._send(
                CoreOp(
                    OpKind.ADD,
                    EngineCoreRequest(request_id, prompt_ids, params, time.monotonic(), priority),
                )
            )
            while len(finished) < params.n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finished.add(item.index)
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if len(finished) < params.n:
                self.abort(request_id)

    # -- from the core ---------------------------------------------------------------

    def _on_message(self, msg: EngineCoreOutputs | CoreEvent) -> None:
        """One message from the core, in either placement: a step's outputs, or the core's death."""
        self._last_msg = time.monotonic()
        if isinstance(msg, EngineCoreOutputs):
            self._on_outputs(msg)
        elif msg.kind is CoreEventKind.DEAD:
            self._die(f"engine loop died: {msg.reason}")

    def _die(self, reason: str) -> None:
        """The core is gone: every waiting consumer gets EngineDeadError, and so does every new request."""
        self._error = EngineDeadError(reason)
        self._fail_all(self._error)

    def _on_outputs(self, outs: EngineCoreOutputs) -> None:
        """State first (the queue check), then the deltas, then the step's measurements."""
        self._stats, self._adds_seen, self.cpu_seconds = outs.stats, outs.adds_seen, outs.cpu_seconds
        if outs.outputs:
            self._deliver_all(
                [(o.request_id, o) if isinstance(o, RequestOutput) else (o[0], o[1]) for o in outs.outputs]
            )
        for listener in self.listeners:
            listener(outs)

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs to their consumers with one wake-up per event loop, not one per
        request: each call_soon_threadsafe writes the loop's self-pipe and invites a GIL hand-off,
        and 256 of them per step kept the engine thread (and so the GPU) waiting."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the consumer's event loop is closed
                pass

    def _fail_all(self, exc: BaseException) -> None:
        """Every waiting consumer gets `exc` (the engine died)."""
        with self._lock:
            rids = list(self._streams)
        self._deliver_all([(rid, exc) for rid in rids])
