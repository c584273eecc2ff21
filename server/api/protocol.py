"""OpenAI-compatible request schemas, the error shape and response builders.

Why strict: every request is validated here, before the engine sees it
(docs/DESIGN.md, "HTTP API"). JSON ``NaN``/``Infinity`` are refused (``allow_inf_nan=False``),
every number has its range, strings must be valid UTF-8 (no lone surrogates).

Unknown top-level fields: OpenAI rejects unrecognized arguments with a 400, and so
do we (``extra="forbid"``), but we *declare* every field the official API defines
(``user``, ``store``, ``metadata``, ``service_tier``, ``parallel_tool_calls`` ...)
plus the vLLM sampling extras load tools send through ``extra_body`` (``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens`` ...). Declared
fields we cannot honour are ignored when harmless (``user``, ``metadata``) and
refused with a 400 when ignoring them would silently change the answer (``tools``,
``response_format`` other than text, ``best_of`` > n, ``suffix``). Unknown keys
inside ``stream_options`` are ignored (``continuous_usage_stats`` from vLLM bench).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 4
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class ProtocolError(Exception):
    """A request the server refuses, with the OpenAI error fields to report."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope. Messages are truncated: never echo a huge input back."""
    if len(message) > 1000:
        message = message[:1000] + "..."
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request models -----------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=None)


def _json_number(v: Any) -> Any:
    """Numbers must be JSON numbers: pydantic's lax mode would take true or "0.5" as floats."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("must be a number")
    return v


Number = Annotated[float, BeforeValidator(_json_number)]
Temperature = Annotated[Number, Field(ge=0.0, le=2.0)]
TopP = Annotated[Number, Field(gt=0.0, le=1.0)]
Penalty = Annotated[Number, Field(ge=-2.0, le=2.0)]
Count = Annotated[StrictInt, Field(ge=1, le=MAX_N)]
Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]


class StreamOptions(BaseModel):
    """``stream_options``: unknown keys (e.g. vLLM's ``continuous_usage_stats``) are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    include_usage: StrictBool | None = False


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object, or json_schema with its `json_schema`."""

    model_config = ConfigDict(extra="allow")
    type: str


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat (OpenAI names, vLLM extras last)."""

    model_config = _STRICT

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Count | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, Annotated[Number, Field(ge=-100.0, le=100.0)]] | None = None
    seed: Seed | None = None
    user: str | None = None
    # Declared by OpenAI, harmless to ignore for a single-tenant text server.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM extras.
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0.0, le=100.0)] | None = None
    ignore_eos: StrictBool | None = False
    min_tokens: Annotated[StrictInt, Field(ge=0, le=0)] | None = None  # only 0 (the default) is supported
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    skip_special_tokens: StrictBool | None = True
    include_stop_str_in_output: Literal[False] | None = None
    spaces_between_special_tokens: bool | None = None
    # Output constraints (server/api/structured_output.py): OpenAI's response_format, vLLM's extras.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # JSON whitespace, as vLLM's
    guided_decoding_backend: str | None = None  # accepted; llguidance serves every constraint
    structured_outputs: dict[str, Any] | None = None
    # vLLM's request priority: lower first, honoured with --scheduling-policy priority.
    priority: Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(v) > 64:
            raise ValueError("at most 64 stop_token_ids are allowed")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PromptType = str | list[StrictInt] | list[str] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: PromptType
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool | None = False
    best_of: Count | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptType) -> PromptType:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], list) and any(len(p) == 0 for p in v):
                raise ValueError("token prompts must not be empty")
            if len(v) > 64 and not isinstance(v[0], int):
                raise ValueError("at most 64 prompts per request")
        return v


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` content part (the only kind a text model takes)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of text parts. An assistant message may
    carry the `tool_calls` it made, a `tool` message answers one of them (`tool_call_id`)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (HF's convention)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        return m

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    # vLLM extras.
    add_generation_prompt: StrictBool | None = True
    echo: StrictBool | None = False


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM shape): a prompt or chat messages."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool | None = True


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = _STRICT
    model: str | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


class FusionRequest(BaseModel):
    """POST /admin/fusion."""

    model_config = _STRICT
    mode: Literal["on", "off", "ab"]


# -- request → engine parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the loaded model allows; needed for checks pydantic cannot do alone."""

    vocab_size: int
    max_model_len: int


def check_token_ids(ids: Sequence[int], limits: Limits, param: str) -> None:
    for t in ids:
        if not 0 <= t < limits.vocab_size:
            raise ProtocolError(
                f"token id {t} is out of range [0, {limits.vocab_size})", param=param, code="invalid_value"
            )


def _logit_bias(bias: dict[str, float] | None, limits: Limits) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise ProtocolError(
                f"logit_bias key {key[:32]!r} is not a token id", param="logit_bias", code="invalid_value"
            ) from None
        if not 0 <= tid < limits.vocab_size:
            raise ProtocolError(
                f"logit_bias token id {tid} is out of range [0, {limits.vocab_size})",
                param="logit_bias",
                code="invalid_value",
            )
        out.append((tid, float(value)))
    return tuple(out)


def sampling_kwargs(req: _SamplingFields, limits: Limits) -> dict[str, Any]:
    """Engine SamplingParams keyword arguments common to both endpoints (max_tokens excluded)."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, limits, "stop_token_ids")
    top_k = req.top_k if req.top_k is not None else 0
    return {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": 0 if top_k < 0 else top_k,
        "min_p": req.min_p or 0.0,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "logit_bias": _logit_bias(req.logit_bias, limits),
        "seed": req.seed,
        "stop": stop,
        "stop_token_ids": tuple(req.stop_token_ids or ()),
        "ignore_eos": bool(req.ignore_eos),
        "n": req.n or 1,
        "skip_special_tokens": req.skip_special_tokens is not False,
    }


def check_unsupported_chat(req: ChatCompletionRequest) -> None:
    """Refuse declared OpenAI features whose silent omission would change the answer."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ProtocolError(
            "top_logprobs requires logprobs to be true", param="top_logprobs", code="invalid_value"
        )
    if req.modalities and any(m != "text" for m in req.modalities):
        raise ProtocolError("only the text modality is supported", param="modalities", code="unsupported")


def request_priority(req: CompletionRequest | ChatCompletionRequest, policy: str) -> int:
    """The request's priority; a non-zero one is refused unless the engine schedules by priority
    (silently dropping it would promise an order the server does not keep)."""
    priority = req.priority or 0
    if priority and policy != "priority":
        raise ProtocolError(
            "priority is only honoured when the server runs with --scheduling-policy priority "
            "(this one schedules first come, first served)",
            param="priority",
            code="unsupported",
        )
    return priority


def check_unsupported_completion(req: CompletionRequest) -> None:
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise ProtocolError("best_of must equal n (or be omitted)", param="best_of", code="unsupported")
    if req.suffix:
        raise ProtocolError("suffix is not supported", param="suffix", code="unsupported")


# -- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finite(x: float) -> float:
    """Logprobs may be -inf (token masked by logit_bias/top-p); JSON has no -inf: clamp."""
    return x if math.isfinite(x) else -9999.0


def check_strings(obj: Any, depth: int = 0) -> None:
    """Refuse lone UTF-16 surrogates anywhere in a parsed JSON body (not valid UTF-8 text)."""
    if depth > 64:
        raise ProtocolError("JSON nesting is too deep", code="invalid_json")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                "strings must be valid UTF-8 (lone surrogate found)", code="invalid_value"
            ) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_strings(k, depth + 1)
            check_strings(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            check_strings(v, depth + 1)
