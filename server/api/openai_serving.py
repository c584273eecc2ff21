"""Completion and chat generation for the HTTP layer: engine requests in, OpenAI JSON out.

Kept apart from app.py so the routes stay thin. Two rules shape this module:

* Errors the engine raises before its first output (queue full, prompt too long)
  must become HTTP status codes, so every engine generator is *primed* (its first
  output awaited) before a response — streaming or not — is started.
* A client that goes away must abort its engine requests in every phase, so the
  caller races each await here against ``http.disconnect`` (see ``fusionserve.server.api.disconnect``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fusionserve.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    ProtocolError,
    check_token_ids,
    check_unsupported_chat,
    check_unsupported_completion,
    finite,
    new_id,
    now,
    sampling_kwargs,
    usage,
)
from fusionserve.server.contract import SamplingParams

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


async def _first(gen: AsyncIterator[Any]) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _merge(primed: Primed) -> AsyncIterator[tuple[int, Any]]:
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


async def _static_outputs(job: Job) -> AsyncIterator[Any]:
    for i in range(job.params.n):
        yield _StaticOutput(job.request_id, i, len(job.prompt_ids))


def _discarded(out: Any) -> Any:
    """The throw-away token of a max_tokens=0 echo+logprobs request: keep only prompt logprobs."""
    return _StaticOutput(out.request_id, out.index, out.prompt_tokens, prompt_logprobs=out.prompt_logprobs,
                         finished=out.finished)  # fmt: skip


class TokenText:
    """Token id → display string (for logprobs), cached: the same ids recur constantly."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.get: Callable[[int], str] = lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)


class Serving:
    """Turns validated requests into engine jobs and engine outputs into OpenAI responses."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.limits = Limits(
            vocab_size=int(self.tokenizer.vocab_size), max_model_len=int(engine.max_model_len)
        )
        self.token_text = TokenText(self.tokenizer)

    # -- request building -----------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ProtocolError(
                f"The model `{model[:200]}` does not exist.",
                status=404,
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    def _check_length(self, n_prompt: int, max_tokens: int, param: str) -> None:
        if n_prompt == 0:
            raise ProtocolError("the prompt must not be empty", param=param, code="invalid_value")
        limit = self.limits.max_model_len
        if n_prompt + max_tokens > limit:
            raise ProtocolError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param=param,
                code="context_length_exceeded",
            )

    def completion_jobs(self, req: CompletionRequest) -> list[Job]:
        self.check_model(req.model)
        check_unsupported_completion(req)
        p = req.prompt
        prompts: list[tuple[str | None, list[int]]]
        if isinstance(p, str):
            prompts = [(p, self.tokenizer.encode(p))]
        elif p and isinstance(p[0], int):
            prompts = [(None, list(p))]  # type: ignore[arg-type]
        elif p and isinstance(p[0], str):
            prompts = [(s, self.tokenizer.encode(s)) for s in p]  # type: ignore[union-attr]
        else:
            prompts = [(None, list(ids)) for ids in p]  # type: ignore[union-attr]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        kw = sampling_kwargs(req, self.limits)
        echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        # The engine needs max_tokens >= 1. max_tokens=0 (scoring a prompt with echo) either needs
        # no model at all, or one throw-away token to get the prompt logprobs computed.
        static = max_tokens == 0 and echo_lp is None
        discard = max_tokens == 0 and echo_lp is not None
        params = SamplingParams(
            max_tokens=1 if discard else max_tokens, logprobs=req.logprobs, prompt_logprobs=echo_lp, **kw
        )
        jobs = []
        for text, ids in prompts:
            if text is None:
                check_token_ids(ids, self.limits, "prompt")
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self._check_length(len(ids), max(max_tokens, 1 if discard else 0), "prompt")
            jobs.append(Job(new_id("cmpl"), ids, text, params, static=static, discard=discard))
        return jobs

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        self.check_model(req.model)
        check_unsupported_chat(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt is not False
            )
        except Exception as exc:  # jinja TemplateError / raise_exception in the template
            raise ProtocolError(
                f"messages cannot be rendered by the chat template: {str(exc)[:300]}",
                param="messages",
                code="invalid_value",
            ) from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(self.limits.max_model_len - len(ids), 0)
            if max_tokens == 0:
                self._check_length(len(ids), 1, "messages")
        self._check_length(len(ids), max_tokens, "messages")
        kw = sampling_kwargs(req, self.limits)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = SamplingParams(max_tokens=max_tokens, logprobs=k, **kw)
        return Job(new_id("chatcmpl"), ids, text, params)

    # -- engine ---------------------------------------------------------------------------------

    async def prime(self, jobs: Sequence[Job]) -> Primed:
        """Start every job and wait for its first output; on any error abort them all."""
        gens = [
            _static_outputs(j) if j.static else self.engine.generate(j.request_id, j.prompt_ids, j.params)
            for j in jobs
        ]
        primed = Primed(list(jobs), [], gens)
        try:
            primed.firsts = list(await asyncio.gather(*(_first(g) for g in gens)))
        except BaseException:
            self.abort(primed.request_ids)
            await primed.aclose()
            raise
        return primed

    def abort(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            with contextlib.suppress(Exception):
                self.engine.abort(rid)

    # -- completions ----------------------------------------------------------------------------

    def _completion_logprobs(
        self, st: ChoiceState, items: Sequence[Any], prompt_items: Sequence[Any] | None = None
    ) -> dict[str, Any]:
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for item in list(prompt_items or []) + list(items):
            if item is None:  # the first prompt token has no logprob
                continue
            s = self.token_text.get(item.token_id)
            tokens.append(s)
            token_lps.append(finite(item.logprob))
            top = {self.token_text.get(t): finite(lp) for t, lp in item.top}
            top.setdefault(s, finite(item.logprob))
            tops.append(top)
            offsets.append(st.text_offset)
            st.text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo_prompt_logprobs(self, st: ChoiceState, job: Job, plps: Sequence[Any] | None) -> dict[str, Any]:
        """Prompt part of echo+logprobs: the first token gets None (nothing precedes it)."""
        tokens, token_lps, tops, offsets = [], [], [], []
        plps = list(plps or [])
        for i, tid in enumerate(job.prompt_ids):
            s = self.token_text.get(tid)
            item = plps[i] if i < len(plps) else None
            tokens.append(s)
            offsets.append(st.text_offset)
            st.text_offset += len(s)
            if item is None:
                token_lps.append(None)
                tops.append(None)
            else:
                token_lps.append(finite(item.logprob))
                top = {self.token_text.get(t): finite(lp) for t, lp in item.top}
                top.setdefault(s, finite(item.logprob))
                tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    @staticmethod
    def _join_lp(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
        if a is None:
            return b
        return {k: a[k] + b[k] for k in b}

    async def completion_full(self, req: CompletionRequest, primed: Primed) -> dict[str, Any]:
        n = req.n or 1
        states: dict[int, ChoiceState] = {}
        lp_objs: dict[int, dict[str, Any] | None] = {}
        prompt_tokens = [len(j.prompt_ids) for j in primed.jobs]
        async for ji, out in _merge(primed):
            if primed.jobs[ji].discard:
                out = _discarded(out)
            idx = ji * n + out.index
            st = states.setdefault(idx, ChoiceState())
            if idx not in lp_objs:
                lp_objs[idx] = None
                if req.echo:
                    st.text.append(primed.jobs[ji].prompt_text)
                    if req.logprobs is not None:
                        lp_objs[idx] = self._echo_prompt_logprobs(st, primed.jobs[ji], out.prompt_logprobs)
            self._absorb(st, out)
            prompt_tokens[ji] = out.prompt_tokens or prompt_tokens[ji]
            if req.logprobs is not None and out.logprobs:
                lp_objs[idx] = self._join_lp(lp_objs[idx], self._completion_logprobs(st, out.logprobs))
        choices = []
        for idx in sorted(states):
            st = states[idx]
            lp = None
            if req.logprobs is not None:
                lp = lp_objs.get(idx) or {
                    "tokens": [],
                    "token_logprobs": [],
                    "top_logprobs": [],
                    "text_offset": [],
                }
            choices.append(
                {"index": idx, "text": "".join(st.text), "logprobs": lp, "finish_reason": st.finish_reason}
            )
        completion_tokens = sum(s.completion_tokens for s in states.values())
        return {
            "id": primed.jobs[0].request_id,
            "object": "text_completion",
            "created": now(),
            "model": self.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage(sum(prompt_tokens), completion_tokens),
        }

    @staticmethod
    def _absorb(st: ChoiceState, out: Any) -> None:
        if out.text:
            st.text.append(out.text)
        st.token_ids.extend(out.token_ids or [])
        st.completion_tokens = max(st.completion_tokens, int(out.completion_tokens or 0))
        if out.finished:
            st.finish_reason = out.finish_reason or "stop"

    async def completion_stream(self, req: CompletionRequest, primed: Primed) -> AsyncIterator[str]:
        n = req.n or 1
        rid, created = primed.jobs[0].request_id, now()
        include_usage = req.include_usage()
        states: dict[int, ChoiceState] = {}
        prompt_tokens = [len(j.prompt_ids) for j in primed.jobs]

        def chunk(idx: int, text: str, lp: dict[str, Any] | None, finish: str | None) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        try:
            async for ji, out in _merge(primed):
                if primed.jobs[ji].discard:
                    out = _discarded(out)
                idx = ji * n + out.index
                first = idx not in states
                st = states.setdefault(idx, ChoiceState())
                prefix, lp = "", None
                if first and req.echo:
                    prefix = primed.jobs[ji].prompt_text
                    if req.logprobs is not None:
                        lp = self._echo_prompt_logprobs(st, primed.jobs[ji], out.prompt_logprobs)
                self._absorb(st, out)
                prompt_tokens[ji] = out.prompt_tokens or prompt_tokens[ji]
                if req.logprobs is not None:
                    lp = self._join_lp(lp, self._completion_logprobs(st, out.logprobs or []))
                text = prefix + (out.text or "")
                finish = st.finish_reason if out.finished else None
                if text or finish or (lp and lp["tokens"]):
                    yield chunk(idx, text, lp, finish)
            if include_usage:
                completion_tokens = sum(s.completion_tokens for s in states.values())
                yield sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": self.model_name,
                        "system_fingerprint": SYSTEM_FINGERPRINT,
                        "choices": [],
                        "usage": usage(sum(prompt_tokens), completion_tokens),
                    }
                )
            yield SSE_DONE
        finally:
            await primed.aclose()

    # -- chat -----------------------------------------------------------------------------------

    def _chat_logprobs(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            s = self.token_text.get(item.token_id)
            out.append(
                {
                    "token": s,
                    "logprob": finite(item.logprob),
                    "bytes": list(s.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": self.token_text.get(t),
                            "logprob": finite(lp),
                            "bytes": list(self.token_text.get(t).encode("utf-8")),
                        }
                        for t, lp in item.top
                    ],
                }
            )
        return out

    async def chat_full(self, req: ChatCompletionRequest, primed: Primed) -> dict[str, Any]:
        states: dict[int, ChoiceState] = {}
        prompt_tokens = len(primed.jobs[0].prompt_ids)
        async for _, out in _merge(primed):
            st = states.setdefault(out.index, ChoiceState())
            self._absorb(st, out)
            prompt_tokens = out.prompt_tokens or prompt_tokens
            if req.logprobs and out.logprobs:
                st.logprobs.extend(self._chat_logprobs(out.logprobs))
        choices = []
        for idx in sorted(states):
            st = states[idx]
            choices.append(
                {
                    "index": idx,
                    "message": {"role": "assistant", "content": "".join(st.text), "refusal": None},
                    "logprobs": {"content": st.logprobs, "refusal": None} if req.logprobs else None,
                    "finish_reason": st.finish_reason,
                }
            )
        return {
            "id": primed.jobs[0].request_id,
            "object": "chat.completion",
            "created": now(),
            "model": self.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage(prompt_tokens, sum(s.completion_tokens for s in states.values())),
        }

    async def chat_stream(self, req: ChatCompletionRequest, primed: Primed) -> AsyncIterator[str]:
        rid, created = primed.jobs[0].request_id, now()
        include_usage = req.include_usage()
        states: dict[int, ChoiceState] = {}
        prompt_tokens = len(primed.jobs[0].prompt_ids)

        def chunk(idx: int, delta: dict[str, Any], lp: Any, finish: str | None) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        try:
            async for _, out in _merge(primed):
                if out.index not in states:
                    yield chunk(out.index, {"role": "assistant", "content": ""}, None, None)
                st = states.setdefault(out.index, ChoiceState())
                self._absorb(st, out)
                prompt_tokens = out.prompt_tokens or prompt_tokens
                lp = None
                if req.logprobs:
                    lp = {"content": self._chat_logprobs(out.logprobs or []), "refusal": None}
                finish = st.finish_reason if out.finished else None
                if out.text or finish or (lp and lp["content"]):
                    delta = {"content": out.text} if out.text else {}
                    yield chunk(out.index, delta, lp, finish)
            if include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": self.model_name,
                        "system_fingerprint": SYSTEM_FINGERPRINT,
                        "choices": [],
                        "usage": usage(prompt_tokens, sum(s.completion_tokens for s in states.values())),
                    }
                )
            yield SSE_DONE
        finally:
            await primed.aclose()
