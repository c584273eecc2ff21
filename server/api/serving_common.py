"""What the completion and chat answers share: the primed engine requests of one HTTP request, the
per-choice state, SSE framing, and the merge of several engine streams (n prompts) into one."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fusionserve.server.api.protocol import now

SYSTEM_FINGERPRINT = "fusionserve"


@dataclass
class Job:
    """One engine request: one prompt, ``n`` choices."""

    request_id: str
    prompt_ids: list[int]
    prompt_text: str
    params: Any
    static: bool = False  # max_tokens=0 without logprobs: answered without the engine
    discard: bool = False  # max_tokens=0 with echo logprobs: generate 1 token for prompt logprobs, drop it
    priority: int = 0  # lower first under --scheduling-policy priority
    constraint: Any = None  # structured_output.Constraint: validated before the job is queued
    tools: Any = None  # ToolUse: the chat answer's tool calls are parsed out of its text


@dataclass(frozen=True)
class ToolUse:
    """What a chat answer needs to find its tool calls: the output format and the known names."""

    parser: str
    names: frozenset[str]


@dataclass
class ChoiceState:
    """What has been generated so far for one choice (index over all prompts × n)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    text_offset: int = 0  # chars emitted so far (completions logprobs text_offset)


@dataclass
class Primed:
    """Engine generators that have produced their first output (errors surfaced)."""

    jobs: list[Job]
    firsts: list[Any]
    gens: list[AsyncIterator[Any]]

    @property
    def request_ids(self) -> list[str]:
        return [j.request_id for j in self.jobs]

    async def aclose(self) -> None:
        for g in self.gens:
            with contextlib.suppress(Exception):
                await g.aclose()  # type: ignore[attr-defined]


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def first_output(gen: AsyncIterator[Any]) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def merge_outputs(primed: Primed) -> AsyncIterator[tuple[int, Any]]:
    """(job index, output) from every generator, first outputs first, in arrival order."""
    for i, out in enumerate(primed.firsts):
        if out is not None:
            yield i, out
    if len(primed.gens) == 1:  # the common case: no tasks needed
        async for out in primed.gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Any] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in primed.gens[i]:
                await queue.put((i, out))
        except BaseException as exc:  # forwarded to the consumer, which re-raises
            await queue.put((i, exc))
            return
        await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(primed.gens))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            i, out = item
            if isinstance(out, BaseException):
                raise out
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _StaticOutput:
    """A RequestOutput-shaped answer for a request that generates nothing."""

    request_id: str
    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = None
    prompt_logprobs: list[Any] | None = None
    finished: bool = True
    finish_reason: str = "length"
    completion_tokens: int = 0


async def static_outputs(job: Job) -> AsyncIterator[Any]:
    for i in range(job.params.n):
        yield _StaticOutput(job.request_id, i, len(job.prompt_ids))


def discarded(out: Any) -> Any:
    """The throw-away token of a max_tokens=0 echo+logprobs request: keep only prompt logprobs."""
    return _StaticOutput(
        out.request_id,
        out.index,
        out.prompt_tokens,
        prompt_logprobs=out.prompt_logprobs,
        finished=out.finished,
    )


class TokenText:
    """Token id → display string (for logprobs), cached: the same ids recur constantly."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.get: Callable[[int], str] = lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)


def stream_chunk(
    rid: str, obj: str, created: int, model: str, choice: dict[str, Any], include_usage: bool
) -> str:
    """One SSE chunk of a streamed answer (`obj`: text_completion / chat.completion.chunk); with
    stream_options.include_usage every chunk carries "usage": null until the last one."""
    body: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [choice],
    }
    if include_usage:
        body["usage"] = None
    return sse(body)


def response_body(
    rid: str, obj: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]
) -> dict:
    """A whole (non-streamed) answer: `obj` is text_completion or chat.completion."""
    return {
        "id": rid,
        "object": obj,
        "created": now(),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }
