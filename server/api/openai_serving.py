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
from collections.abc import Sequence
from typing import Any

from fusionserve.server.api.chat_responses import ChatResponses
from fusionserve.server.api.completion_responses import CompletionResponses
from fusionserve.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    ProtocolError,
    check_token_ids,
    check_unsupported_chat,
    check_unsupported_completion,
    new_id,
    request_priority,
    sampling_kwargs,
)
from fusionserve.server.api.serving_common import (
    Job,
    Primed,
    TokenText,
    ToolUse,
    first_output,
    static_outputs,
)
from fusionserve.server.api.structured_output import Constraint, GrammarValidator, request_constraint
from fusionserve.server.api.tool_calls import (
    detect_parser,
    parse_tools,
    resolve_choice,
    template_messages,
    tool_grammar,
)
from fusionserve.server.contract import SamplingParams


class Serving(CompletionResponses, ChatResponses):
    """Turns validated requests into engine jobs and engine outputs into OpenAI responses."""

    def __init__(self, engine: Any, model_name: str, tool_parser: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.limits = Limits(
            vocab_size=int(self.tokenizer.vocab_size), max_model_len=int(engine.max_model_len)
        )
        self.token_text = TokenText(self.tokenizer)
        template = getattr(self.tokenizer, "chat_template", None)
        self.chat_template = template if isinstance(template, str) else None
        self.tool_parser = tool_parser or detect_parser(self.chat_template)
        model_dir = getattr(self.tokenizer, "model_dir", None)
        vocab = int(getattr(getattr(engine, "limits", None), "vocab_size", 0) or self.limits.vocab_size)
        self.grammars = GrammarValidator(model_dir / "tokenizer.json" if model_dir else None, vocab)
        self.scheduling_policy = getattr(engine, "scheduling_policy", "fcfs")

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
        priority = request_priority(req, self.scheduling_policy)
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
        constraint = request_constraint(req)
        echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        # The engine needs max_tokens >= 1. max_tokens=0 (scoring a prompt with echo) either needs
        # no model at all, or one throw-away token to get the prompt logprobs computed.
        static = max_tokens == 0 and echo_lp is None
        discard = max_tokens == 0 and echo_lp is not None
        params = SamplingParams(
            max_tokens=1 if discard else max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=echo_lp,
            grammar=constraint.grammar if constraint else None,
            **kw,
        )
        jobs = []
        for text, ids in prompts:
            if text is None:
                check_token_ids(ids, self.limits, "prompt")
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self._check_length(len(ids), max(max_tokens, 1 if discard else 0), "prompt")
            jobs.append(Job(new_id("cmpl"), ids, text, params, static, discard, priority, constraint))
        return jobs

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        self.check_model(req.model)
        check_unsupported_chat(req)
        priority = request_priority(req, self.scheduling_policy)
        tools = parse_tools(req.tools)
        choice = resolve_choice(req.tool_choice, tools)
        constraint = request_constraint(req)
        if choice not in ("none", "auto"):
            if constraint is not None:
                raise ProtocolError(
                    f"tool_choice {choice!r} cannot be combined with {constraint.param}", param="tool_choice"
                )
            grammar = tool_grammar(tools, choice, req.parallel_tool_calls is not False, self.tool_parser)
            constraint = Constraint(grammar, "tools", "tools")
        messages, extra = template_messages(
            [m.for_template() for m in req.messages], tools, self.tool_parser, self.chat_template
        )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt is not False, **extra
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
        params = SamplingParams(
            max_tokens=max_tokens, logprobs=k, grammar=constraint.grammar if constraint else None, **kw
        )
        use = (
            ToolUse(self.tool_parser, frozenset(t.name for t in tools))
            if tools and choice != "none"
            else None
        )
        return Job(new_id("chatcmpl"), ids, text, params, priority=priority, constraint=constraint, tools=use)

    async def check_constraints(self, jobs: Sequence[Job]) -> None:
        """Compile each new grammar once (off the event loop, time-limited): a 400 before queueing."""
        for constraint in {j.constraint for j in jobs if j.constraint is not None}:
            await self.grammars.check(constraint)

    # -- engine ---------------------------------------------------------------------------------

    async def prime(self, jobs: Sequence[Job]) -> Primed:
        """Start every job and wait for its first output; on any error abort them all."""
        gens = [
            static_outputs(j)
            if j.static
            else self.engine.generate(j.request_id, j.prompt_ids, j.params, j.priority)
            for j in jobs
        ]
        primed = Primed(list(jobs), [], gens)
        try:
            primed.firsts = list(await asyncio.gather(*(first_output(g) for g in gens)))
        except BaseException:
            self.abort(primed.request_ids)
            await primed.aclose()
            raise
        return primed

    def abort(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
