"""A tiny stand-in for an EngineClient (docs/DESIGN.md, "Engine client") for fast HTTP tests.

Byte-level tokenizer, deterministic "model" (cycles through a fixed text), a real
asyncio pacing per token, and bookkeeping of running/aborted requests so tests can
check that disconnects abort. No torch, no model files: these tests run in seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fusionserve.server.contract import EngineDeadError, QueueFullError, SamplingParams

OFFSET = 3  # ids 0..2 are special: 0 pad, 1 bos, 2 eos
EOS = 2


class FakeTokenizer:
    vocab_size = 256 + OFFSET
    eos_token_ids = frozenset({EOS})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i >= OFFSET:
                out.append(i - OFFSET)
            elif not skip_special_tokens:
                out += f"<{i}>".encode()
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if m["role"] not in ("system", "user", "assistant", "developer"):
                raise ValueError("bad role")
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class FakeEngine:
    """Generates ``TEXT`` cyclically (seed shifts the start), one token per ``delay`` seconds."""

    delay: float = 0.002
    max_model_len: int = 512
    max_queue: int = 1000
    model_name: str = "fake-model"
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    fusion_mode: str = "on"
    listeners: list = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    aborted: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    draining: bool = False
    alive: bool = True
    restarting: bool = False
    scheduling_policy: str = "fcfs"
    priorities: list[int] = field(default_factory=list)
    restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    TEXT = "hello world, this is a fake model. "

    def start(self) -> None:
        pass

    def set_fusion_mode(self, mode: str) -> None:
        self.fusion_mode = mode

    def is_alive(self) -> bool:
        return self.alive

    def abort(self, request_id: str) -> None:
        with self.lock:
            if request_id in self.running:
                self.aborted.add(request_id)

    def begin_drain(self) -> None:
        self.draining = True

    def stats(self) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(running=len(self.running), waiting=0, kv_usage=len(self.running) / 100)

    async def wait_idle(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.running and loop.time() < end:
            await asyncio.sleep(0.01)
        return not self.running

    def shutdown(self) -> None:
        self.alive = False

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        if self.draining:
            raise EngineDeadError("shutting down")
        if len(self.running) >= self.max_queue:
            raise QueueFullError("queue full")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError("too long")
        with self.lock:
            self.running.add(request_id)
            self.priorities.append(priority)
        try:
            plps = None
            if params.prompt_logprobs is not None:
                plps = [None] + [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in prompt_ids[1:]]
            start = (params.seed or 0) % len(self.TEXT) if params.temperature > 0 else 0
            texts = ["" for _ in range(params.n)]
            counts = [0] * params.n
            done = [False] * params.n
            first = True
            if params.max_tokens == 0:
                for i in range(params.n):
                    yield RequestOutput(
                        request_id,
                        i,
                        "",
                        [],
                        [] if params.logprobs is not None else None,
                        plps if i == 0 else None,
                        True,
                        "length",
                        len(prompt_ids),
                        0,
                    )
                return
            while not all(done):
                await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    return
                for i in range(params.n):
                    if done[i]:
                        continue
                    ch = self.TEXT[(start + i + counts[i]) % len(self.TEXT)]
                    tid = ord(ch) + OFFSET
                    counts[i] += 1
                    texts[i] += ch
                    finish = None
                    out_text = ch
                    for s in params.stop:
                        if texts[i].endswith(s):
                            finish = "stop"
                            out_text = ch[: max(0, len(ch) - len(s))]
                    if finish is None and counts[i] >= params.max_tokens:
                        finish = "length"
                    done[i] = finish is not None
                    lps = None
                    if params.logprobs is not None:
                        lps = [TokenLogprob(tid, -0.5, [(tid, -0.5), (OFFSET + 65, -2.0)][: params.logprobs])]
                    yield RequestOutput(
                        request_id,
                        i,
                        out_text,
                        [tid],
                        lps,
                        plps if first else None,
                        done[i],
                        finish,
                        len(prompt_ids),
                        counts[i],
                    )
                first = False
        finally:
            with self.lock:
                self.running.discard(request_id)
                self.finished.add(request_id)
