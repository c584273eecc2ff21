"""The engine core in its own process, so that the GPU loop and the HTTP server stop sharing one GIL.

Why: in one process the engine thread (schedule, launch, per-token bookkeeping) and the asyncio
thread (one SSE chunk per token per stream) take turns on one GIL. At 256 streams of an 8B model
on an H100 the engine waited ~40% of the time for it and the GPU idled between decode steps
(24 ms per step for 14.6 ms of GPU work). Here the core runs in a spawned child (CUDA does not
survive fork; `core.core_main`) and talks to the HTTP process over two one-way pipes: CoreOps in,
EngineCoreOutputs and CoreEvents out. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import threading
import time

from fusionserve.server import contract
from fusionserve.server.contract import CoreEventKind, CoreOp, OpKind
from fusionserve.server.engine.client import EngineClient
from fusionserve.server.engine.core import core_main

log = logging.getLogger("fusionserve.engine")


class ProcessEngineClient(EngineClient):
    """Spawns the core, waits until it is READY, then feeds it through a sender thread (a full pipe
    never blocks the event loop) and reads its messages on a reader thread."""

    def __init__(
        self,
        config: contract.EngineConfig,
        *,
        switch_ms: float = 0.0,
        log_level: str = "info",
        start_timeout_s: float = 3600.0,
    ) -> None:
        from fusionserve.models.registry import resolve_model
        from fusionserve.models.tokenizer import load_tokenizer

        model_dir = resolve_model(config.model_dir)  # converts the default GGUF once, here
        config = dataclasses.replace(
            config, model_dir=str(model_dir), served_model_name=config.served_model_name or model_dir.name
        )
        ctx = mp.get_context("spawn")
        ops_child, self._ops = ctx.Pipe(duplex=False)
        self._out, out_child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=core_main,
            args=(config, ops_child, out_child, switch_ms, log_level),
            name="fusionserve-engine",
            daemon=True,
        )
        self._proc.start()
        ops_child.close()
        out_child.close()
        super().__init__(config, load_tokenizer(model_dir))  # while the child loads the weights
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        info = self._wait_ready(start_timeout_s)
        self._ready(dataclasses.replace(info, kernel_path=info.kernel_path + ", engine process"))
        self._reader = threading.Thread(target=self._read, name="fusionserve-engine-pipe", daemon=True)
        self._sender = threading.Thread(target=self._write, name="fusionserve-engine-ops", daemon=True)

    def _wait_ready(self, timeout_s: float) -> contract.CoreInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._out.poll(0.5):
                try:
                    event: contract.CoreEvent = self._out.recv()
                except EOFError:
                    break
                if event.kind is CoreEventKind.READY:
                    return event.info
                self._proc.join(10)
                raise contract.EngineStartError(event.reason)
            if not self._proc.is_alive():
                break
        self._kill()
        code = self._proc.exitcode
        raise contract.EngineStartError(
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
        return self._responsive()

    def shutdown(self) -> None:
        """Stop the child; every request still in flight finishes with 'abort'."""
        self._draining = True
        if not self._stopping:
            self._stopping = True
            if self._sender.is_alive():
                self._send(CoreOp(OpKind.STOP))
            else:  # never started
                try:
                    self._ops.send(CoreOp(OpKind.STOP))
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

    # -- the pipe threads -------------------------------------------------------------

    def _send(self, op: CoreOp) -> None:
        """Queue an op for the child. A pipe write blocks while the child is inside a step and the
        pipe is full (500 prompts arriving at once are ~1 MB of ops): the sender thread waits
        then, never the event loop."""
        self._outbox.put(op)

    def _write(self) -> None:
        while True:
            op = self._outbox.get()
            try:
                self._ops.send(op)
            except OSError:  # the child is gone; the reader reports it
                return
            if op.kind is OpKind.STOP:
                return

    def _read(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                msg = self._out.recv()
                if isinstance(msg, contract.CoreEvent) and msg.kind is CoreEventKind.STOPPED:
                    return
                if isinstance(msg, contract.CoreEvent) and msg.kind is CoreEventKind.DEAD:
                    reason = f"engine loop died: {msg.reason}"
                    break
                self._on_message(msg)
        except (EOFError, OSError):
            pass
        if not self._stopping:
            log.error("%s", reason)
        self._die(reason)
