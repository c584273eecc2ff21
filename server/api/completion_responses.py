"""/v1/completions answers: full JSON and SSE chunks, logprobs in the legacy shape, echo."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fusionserve.server.api.protocol import CompletionRequest, finite, now, usage
from fusionserve.server.api.serving_common import (
    SSE_DONE,
    SYSTEM_FINGERPRINT,
    ChoiceState,
    Job,
    Primed,
    discarded,
    merge_outputs,
    response_body,
    sse,
    stream_chunk,
)


class CompletionResponses:
    """Mixed into Serving: the answers of a primed /v1/completions request."""

    token_text: Any
    model_name: str

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
        async for ji, out in merge_outputs(primed):
            if primed.jobs[ji].discard:
                out = discarded(out)
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
        tokens = usage(sum(prompt_tokens), completion_tokens)
        return response_body(primed.jobs[0].request_id, "text_completion", self.model_name, choices, tokens)

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
            choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": finish}
            return stream_chunk(rid, "text_completion", created, self.model_name, choice, include_usage)

        try:
            async for ji, out in merge_outputs(primed):
                if primed.jobs[ji].discard:
                    out = discarded(out)
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
