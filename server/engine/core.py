"""The engine-core loop, the same in both placements: a thread of the server process
(`ThreadEngineClient`) or a spawned process of its own (`ProcessEngineClient`, `core_main`).

Each turn: apply every queued op (in order), run one engine step, emit one EngineCoreOutputs
(the step's deltas, its StepStats, the engine's stats). An idle core still emits every
`IDLE_BEAT_S`, so the client's view of the queue stays fresh. This module does not import
torch: the process client names `core_main` as the child's entry point, and the child imports
the compute side itself.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from fusionserve.server.contract import (
    CoreEvent,
    CoreEventKind,
    CoreInfo,
    CoreOp,
    EngineConfig,
    EngineCoreOutputs,
    OpKind,
    RequestOutput,
)

if TYPE_CHECKING:
    from fusionserve.server.engine.llm_engine import LLMEngine

log = logging.getLogger("fusionserve.engine")

IDLE_BEAT_S = 0.5  # an idle core still reports its stats this often


class Inbox(Protocol):
    """Where ops arrive: a multiprocessing Connection, or `OpQueue` for the thread placement."""

    def poll(self, timeout: float = 0.0) -> bool: ...

    def recv(self) -> CoreOp: ...


def core_info(engine: LLMEngine) -> CoreInfo:
    return CoreInfo(
        engine.model_name, engine.kernel_path, engine.limits, engine.stats(), engine.max_model_len_why
    )


class EngineCore:
    """Drive an LLMEngine from an inbox of ops; hand every EngineCoreOutputs / CoreEvent to `emit`."""

    def __init__(
        self, engine: LLMEngine, inbox: Inbox, emit: Callable[[EngineCoreOutputs | CoreEvent], None]
    ):
        self.engine = engine
        self.inbox = inbox
        self.emit = emit
        self.adds = 0  # ADD ops applied: the client's queue-full check counts those not seen yet
        self.pending: list[RequestOutput | tuple[str, Exception]] = []
        self.stopping = False

    def run(self) -> None:
        """Serve until STOP (then every request still running ends with 'abort'). A crash is
        reported as a DEAD event and re-raised; a closed pipe (the server is gone) just returns."""
        eng = self.engine
        try:
            last_sent = 0.0
            while not self.stopping:
                busy = eng.has_unfinished()
                applied = self.inbox.poll(0 if busy else IDLE_BEAT_S)
                if applied:
                    self._apply_ops()
                if eng.has_unfinished() and not self.stopping:
                    self.pending.extend(eng.step())
                if self.pending or busy or applied or time.monotonic() - last_sent >= IDLE_BEAT_S:
                    self._send_outputs()
                    last_sent = time.monotonic()
            for rid in list(eng.requests):
                self.pending.extend(eng.abort_request(rid))
            self._send_outputs()
            self.emit(CoreEvent(CoreEventKind.STOPPED))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return
        except BaseException as exc:
            log.exception("engine loop died")
            try:
                self.emit(CoreEvent(CoreEventKind.DEAD, reason=f"{type(exc).__name__}: {exc}"))
            except OSError:
                pass
            raise

    def _send_outputs(self) -> None:
        eng = self.engine
        outs = EngineCoreOutputs(
            self.pending, eng.take_step_stats(), eng.stats(), self.adds, time.process_time()
        )
        self.pending = []
        self.emit(outs)

    def _apply_ops(self) -> None:
        eng = self.engine
        while not self.stopping and self.inbox.poll(0):
            op = self.inbox.recv()
            if op.kind is OpKind.ADD:
                req = op.payload
                self.adds += 1
                try:
                    eng.add_request(req.request_id, req.prompt_ids, req.params, req.arrival, req.priority)
                except Exception as exc:  # checked by the client already; a duplicate id lands here
                    self.pending.append((req.request_id, exc))
            elif op.kind is OpKind.ABORT:
                self.pending.extend(eng.abort_request(op.payload))
            elif op.kind is OpKind.SET_FUSION:
                eng.fusion.set_mode(op.payload)
            elif op.kind is OpKind.STOP:
                self.stopping = True


def core_main(config: EngineConfig, ops: Any, out: Any, switch_ms: float, log_level: str) -> None:
    """Entry point of the engine process: build the engine, report READY, serve until STOP."""
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
        from fusionserve.server.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException as exc:  # whatever stops the start-up goes to the parent
        out.send(CoreEvent(CoreEventKind.FAILED, reason=f"{type(exc).__name__}: {exc}"))
        return
    try:
        out.send(CoreEvent(CoreEventKind.READY, info=core_info(engine)))
    except OSError:  # the HTTP process went away while the model loaded
        return
    EngineCore(engine, ops, out.send).run()
