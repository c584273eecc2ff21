"""The engine core on a thread of the server process (`--engine-core thread`): one process,
for debugging and profiling; the server's default is ProcessEngineClient."""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from fusionserve.server.contract import (
    CoreOp,
    EngineConfig,
    OpKind,
)
from fusionserve.server.engine.client import EngineClient
from fusionserve.server.engine.core import EngineCore, core_info

if TYPE_CHECKING:
    from fusionserve.server.engine.llm_engine import LLMEngine


class OpQueue:
    """A thread-safe inbox with a Connection's `poll` / `recv` (the core reads both alike)."""

    def __init__(self) -> None:
        self._ops: deque[CoreOp] = deque()
        self._ready = threading.Condition()

    def put(self, op: CoreOp) -> None:
        with self._ready:
            self._ops.append(op)
            self._ready.notify()

    def poll(self, timeout: float = 0.0) -> bool:
        with self._ready:
            if not self._ops and timeout > 0:
                self._ready.wait(timeout)
            return bool(self._ops)

    def recv(self) -> CoreOp:
        with self._ready:
            return self._ops.popleft()


class ThreadEngineClient(EngineClient):
    def __init__(self, config: EngineConfig, *, engine: LLMEngine | None = None):
        if engine is None:
            from fusionserve.server.engine.llm_engine import LLMEngine

            engine = LLMEngine(config)
        super().__init__(config, engine.tokenizer)
        self.engine = engine
        self._ready(core_info(engine))
        self._ops = OpQueue()
        self._core = EngineCore(engine, self._ops, self._on_message)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fusionserve-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._core.run()
        except BaseException as exc:  # the DEAD event told the consumers; keep the reason
            self._error = exc
            # A thread core is not respawned (a CUDA error poisons this whole process): give up.
            self._give_up_with(f"engine loop died: {type(exc).__name__}: {exc}")

    def _send(self, op: CoreOp) -> None:
        self._ops.put(op)

    def _engine_running(self) -> bool:
        return not self._core.stopping and (self._thread is None or self._thread.is_alive())

    def is_alive(self) -> bool:
        if self._thread is None or self._error is not None or not self._engine_running():
            return False
        return self._responsive()

    def shutdown(self) -> None:
        """Stop the core; every request still in flight finishes with 'abort'."""
        self._draining = True
        self._send(CoreOp(OpKind.STOP))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
