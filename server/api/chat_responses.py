"""/v1/chat/completions answers: full JSON and SSE chunks with the chat logprobs shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fusionserve.server.api.protocol import ChatCompletionRequest, finite, now, usage
from fusionserve.server.api.serving_common import (
    SSE_DONE,
    SYSTEM_FINGERPRINT,
    ChoiceState,
    Primed,
    merge_outputs,
    response_body,
    sse,
    stream_chunk,
)
from fusionserve.server.api.tool_calls import StreamedToolCalls, parse_tool_calls


def _message(text: str, finish: str | None, tools: Any) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice (tool calls parsed out when tools are in play)
    and its finish_reason ("tool_calls" when it called any)."""
    if tools is None:
        return {"role": "assistant", "content": text, "refusal": None}, finish
    content, calls = parse_tool_calls(text, tools.parser, set(tools.names))
    if not calls:
        return {"role": "assistant", "content": text, "refusal": None}, finish
    message = {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "tool_calls": [c.openai() for c in calls],
    }
    return message, ("tool_calls" if finish == "stop" else finish)


class ChatResponses:
    """Mixed into Serving: the answers of a primed /v1/chat/completions request."""

    token_text: Any
    model_name: str

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
        async for _, out in merge_outputs(primed):
            st = states.setdefault(out.index, ChoiceState())
            self._absorb(st, out)
            prompt_tokens = out.prompt_tokens or prompt_tokens
            if req.logprobs and out.logprobs:
                st.logprobs.extend(self._chat_logprobs(out.logprobs))
        choices = []
        tools = primed.jobs[0].tools
        for idx in sorted(states):
            st = states[idx]
            message, finish = _message("".join(st.text), st.finish_reason, tools)
            choices.append(
                {
                    "index": idx,
                    "message": message,
                    "logprobs": {"content": st.logprobs, "refusal": None} if req.logprobs else None,
                    "finish_reason": finish,
                }
            )
        tokens = usage(prompt_tokens, sum(s.completion_tokens for s in states.values()))
        return response_body(primed.jobs[0].request_id, "chat.completion", self.model_name, choices, tokens)

    async def chat_stream(self, req: ChatCompletionRequest, primed: Primed) -> AsyncIterator[str]:
        rid, created = primed.jobs[0].request_id, now()
        include_usage = req.include_usage()
        states: dict[int, ChoiceState] = {}
        prompt_tokens = len(primed.jobs[0].prompt_ids)

        def chunk(idx: int, delta: dict[str, Any], lp: Any, finish: str | None) -> str:
            choice = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return stream_chunk(rid, "chat.completion.chunk", created, self.model_name, choice, include_usage)

        tools = primed.jobs[0].tools
        calls: dict[int, StreamedToolCalls] = {}
        try:
            async for _, out in merge_outputs(primed):
                if out.index not in states:
                    yield chunk(out.index, {"role": "assistant", "content": ""}, None, None)
                    if tools is not None:
                        calls[out.index] = StreamedToolCalls(tools.parser, set(tools.names))
                st = states.setdefault(out.index, ChoiceState())
                self._absorb(st, out)
                prompt_tokens = out.prompt_tokens or prompt_tokens
                lp = None
                if req.logprobs:
                    lp = {"content": self._chat_logprobs(out.logprobs or []), "refusal": None}
                finish = st.finish_reason if out.finished else None
                text, call_deltas = calls[out.index].feed(out.text) if tools is not None else (out.text, [])
                if finish and tools is not None:  # what the scanner did not stream, then the finish
                    rest, more, called = calls[out.index].finish()
                    text, call_deltas = text + rest, call_deltas + more
                    if called and finish == "stop":
                        finish = "tool_calls"
                if call_deltas:
                    if text:
                        yield chunk(out.index, {"content": text}, lp, None)
                        text, lp = "", None
                    yield chunk(out.index, {"tool_calls": call_deltas}, lp, None)
                    lp = None
                if text or finish or (lp and lp["content"]):
                    delta = {"content": text} if text else {}
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
