"""The engine core in its own process, so that the GPU loop and the HTTP server stop sharing one GIL.

Why: in one process the engine thread (schedule, launch, per-token bookkeeping) and the asyncio
thread (one SSE chunk per token per stream) take turns on one GIL. At 256 streams of an 8B model
on an H100 the engine waited ~40% of the time for it and the GPU idled between decode steps
(24 ms per step for 14.6 ms of GPU work). Here the core runs in a spawned child (CUDA does not
survive fork; `core.core_main`) and talks to the HTTP process over two one-way pipes: CoreOps in,
EngineCoreOutputs and CoreEvents out. This module imports no torch.

Supervision (docs/DESIGN.md, "Engine supervision"): with a RestartPolicy, a child that dies (any
signal or exit, a DEAD event, or no message for WEDGED_AFTER_S while requests wait) fails the
requests in flight, is respawned with the same model and options (and the current fusion mode)
after a backoff, and the client serves again once the new child is READY. When the policy gives up,
`on_give_up` is called (the server exits non-zero).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass

from fusionserve.server import contract
from fusionserve.server.contract import CoreEventKind, CoreOp, OpKind
from fusionserve.server.engine.client import EngineClient
from fusionserve.server.engine.core import core_main
from fusionserve.server.engine.supervisor import DeathLog, RestartPolicy, describe_exit

log = logging.getLogger("fusionserve.engine")


@dataclass
class _Child:
    """One incarnation of the engine process with its pipes and the two threads that serve them."""

    proc: mp.process.BaseProcess
    ops: object  # Connection: CoreOps to the child
    out: object  # Connection: messages from the child
    outbox: queue.SimpleQueue
    reader: threading.Thread | None = None
    sender: threading.Thread | None = None


class ProcessEngineClient(EngineClient):
    """Spawns the core, waits until it is READY, then feeds it through a sender thread (a full pipe
    never blocks the event loop) and reads its messages on a reader thread; with a `restart` policy
    it respawns a child that died."""

    WATCH_EVERY_S = 2.0

    def __init__(
        self,
        config: contract.EngineConfig,
        *,
        switch_ms: float = 0.0,
        log_level: str = "info",
        start_timeout_s: float = 3600.0,
        restart: RestartPolicy | None = None,
    ) -> None:
        from fusionserve.models.registry import resolve_model
        from fusionserve.models.tokenizer import load_tokenizer

        model_dir = resolve_model(config.model_dir)  # converts the default GGUF once, here
        config = dataclasses.replace(
            config, model_dir=str(model_dir), served_model_name=config.served_model_name or model_dir.name
        )
        self._spawn_args = (switch_ms, log_level, start_timeout_s)
        child = self._spawn(config)
        super().__init__(config, load_tokenizer(model_dir))  # while the child loads the weights
        self._deaths = DeathLog(restart) if restart is not None else None
        self._stopping = False
        self._child = child
        self._ready_child(self._wait_ready(child))
        self._wake = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fusionserve-engine-watch", daemon=True)

    @property
    def _proc(self) -> mp.process.BaseProcess:
        return self._child.proc

    def _spawn(self, config: contract.EngineConfig) -> _Child:
        switch_ms, log_level, _ = self._spawn_args
        ctx = mp.get_context("spawn")
        ops_child, ops = ctx.Pipe(duplex=False)
        out, out_child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=core_main,
            args=(config, ops_child, out_child, switch_ms, log_level),
            name="fusionserve-engine",
            daemon=True,
        )
        proc.start()
        ops_child.close()
        out_child.close()
        log.info("engine process started (pid %d)", proc.pid)
        return _Child(proc, ops, out, queue.SimpleQueue())

    def _ready_child(self, info: contract.CoreInfo) -> None:
        self._ready(dataclasses.replace(info, kernel_path=info.kernel_path + ", engine process"))

    def _wait_ready(self, child: _Child) -> contract.CoreInfo:
        timeout_s = self._spawn_args[2]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.out.poll(0.5):
                try:
                    event: contract.CoreEvent = child.out.recv()
                except EOFError:
                    break
                if event.kind is CoreEventKind.READY:
                    return event.info
                child.proc.join(10)
                raise contract.EngineStartError(event.reason)
            if not child.proc.is_alive():
                break
        _kill(child.proc)
        code = child.proc.exitcode
        raise contract.EngineStartError(
            f"the engine process exited during start-up ({describe_exit(code)})"
            if code is not None
            else f"the engine process did not start within {timeout_s:.0f}s"
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._child.reader is None and not self._stopping:
            self._start_threads(self._child)
            self._watcher.start()

    def _start_threads(self, child: _Child) -> None:
        child.reader = threading.Thread(
            target=self._read, args=(child,), name="fusionserve-engine-pipe", daemon=True
        )
        child.sender = threading.Thread(
            target=self._write, args=(child,), name="fusionserve-engine-ops", daemon=True
        )
        child.reader.start()
        child.sender.start()

    def _engine_running(self) -> bool:
        return not self._stopping and not self.restarting and self._child.proc.is_alive()

    def is_alive(self) -> bool:
        reader = self._child.reader
        if self._error is not None or not self._engine_running() or reader is None or not reader.is_alive():
            return False
        return self._responsive()

    def shutdown(self) -> None:
        """Stop the child; every request still in flight finishes with 'abort'."""
        self._draining = True
        child = self._child
        if not self._stopping:
            self._stopping = True
            self._wake.set()
            if child.sender is not None and child.sender.is_alive():
                self._send(CoreOp(OpKind.STOP))
            else:  # never started
                try:
                    child.ops.send(CoreOp(OpKind.STOP))
                except OSError:
                    pass
        reader = child.reader
        if reader is not None and reader.is_alive() and reader is not threading.current_thread():
            reader.join(timeout=30)
        child.proc.join(timeout=10)
        _kill(child.proc)

    # -- the pipe threads -------------------------------------------------------------

    def _send(self, op: CoreOp) -> None:
        """Queue an op for the child. A pipe write blocks while the child is inside a step and the
        pipe is full (500 prompts arriving at once are ~1 MB of ops): the sender thread waits
        then, never the event loop. An ADD while the engine is dead or respawning fails here, so
        no request waits on a child that will never see it."""
        if op.kind is OpKind.ADD and self._error is not None:
            raise self._error
        self._child.outbox.put(op)

    def _write(self, child: _Child) -> None:
        while True:
            op = child.outbox.get()
            if op is None:  # this child is gone
                return
            try:
                child.ops.send(op)
            except OSError:  # the child is gone; the reader reports it
                return
            if op.kind is OpKind.STOP:
                return

    def _read(self, child: _Child) -> None:
        reason = "the engine process exited"
        try:
            while True:
                msg = child.out.recv()
                if isinstance(msg, contract.CoreEvent) and msg.kind is CoreEventKind.STOPPED:
                    return
                if isinstance(msg, contract.CoreEvent) and msg.kind is CoreEventKind.DEAD:
                    reason = f"engine loop died: {msg.reason}"
                    break
                self._on_message(msg)
        except (EOFError, OSError):
            pass
        self._child_died(child, reason)

    # -- supervision -------------------------------------------------------------------

    def _child_died(self, child: _Child, reason: str) -> None:
        """Fail what was in flight; then respawn (in the watcher thread), give up, or just stop."""
        child.outbox.put(None)
        if self._stopping:
            self._die(reason)
            return
        child.proc.join(5)
        _kill(child.proc)
        reason = f"{reason} (pid {child.proc.pid}, {describe_exit(child.proc.exitcode)})"
        log.error("%s", reason)
        self.restarting = self._deaths is not None
        self._die(reason)
        self._wake.set()

    def _watch(self) -> None:
        """Respawn a dead child; kill a wedged one (its reader then reports the death)."""
        while not self._stopping:
            self._wake.wait(self.WATCH_EVERY_S)
            self._wake.clear()
            if self._stopping:
                return
            if self.restarting:
                self._respawn()
            elif self._error is None and not self._responsive():
                log.error(
                    "engine process %d sent nothing for %.0fs with requests waiting: killing it",
                    self._child.proc.pid,
                    self.WEDGED_AFTER_S,
                )
                self._child.proc.kill()  # it ignores SIGTERM, and a wedged loop would not see it

    def _respawn(self) -> None:
        assert self._deaths is not None
        while not self._stopping:
            backoff = self._deaths.record()
            if backoff is None:
                self._give_up()
                return
            log.warning("respawning the engine process in %.0fs", backoff)
            time.sleep(backoff)
            config = dataclasses.replace(self.config, fusion=self.fusion_mode)
            child = self._spawn(config)
            try:
                info = self._wait_ready(child)
            except contract.EngineStartError as exc:
                log.error("the respawned engine failed to start: %s", exc)
                continue
            self._child = child
            self._adds_sent = self._adds_seen = 0
            self._ready_child(info)
            self._start_threads(child)
            self.restarts += 1
            self._error = None
            self.restarting = False
            log.info("engine process respawned (pid %d, restart %d)", child.proc.pid, self.restarts)
            return

    def _give_up(self) -> None:
        p = self._deaths.policy if self._deaths else RestartPolicy()
        reason = f"the engine died {p.max_deaths} times within {p.window_s:.0f}s: giving up"
        log.critical("%s", reason)
        self.restarting = False
        self._give_up_with(reason)


def _kill(proc: mp.process.BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
