"""The typed messages between an engine client (HTTP process) and the engine core.

One vocabulary for both placements of the core (a thread of the server process, or its own
process behind two pipes): the client sends `CoreOp`s in order and receives one
`EngineCoreOutputs` per step. Everything here is plain data (picklable, torch-free), so the
HTTP process imports it without the compute side; vLLM v1's EngineCoreRequest / EngineCoreOutputs
are the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fusionserve.server.engine.errors import RequestTooLongError
from fusionserve.server.engine.params import SamplingParams, TokenLogprob


class OpKind(enum.Enum):
    ADD = "add"  # payload: EngineCoreRequest
    ABORT = "abort"  # payload: request id
    SET_FUSION = "set_fusion"  # payload: "on" | "off" | "ab"
    STOP = "stop"  # payload: None; every request still running ends with "abort"


@dataclass(frozen=True)
class EngineCoreRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() of the HTTP process (same clock in a child on one host)


@dataclass(frozen=True)
class CoreOp:
    kind: OpKind
    payload: EngineCoreRequest | str | None = None


@dataclass
class RequestOutput:
    """One delta of one choice of a request."""

    request_id: str
    index: int  # which of the n choices
    text: str  # new detokenized text since last yield (stop strings never included)
    token_ids: list[int]  # new token ids since last yield
    logprobs: list[TokenLogprob] | None  # for those tokens, when asked
    prompt_logprobs: list[TokenLogprob | None] | None  # once, on the first yield, when asked (first is None)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    prompt_tokens: int
    completion_tokens: int  # cumulative for this choice


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step (the gauges, /health's queue-full check)."""

    running: int
    waiting: int
    kv_usage: float
    preemptions: int
    prefix_hit_rate: float
    steps: int
    num_blocks: int = 0
    free_blocks: int = 0


@dataclass(frozen=True)
class FinishedRequest:
    reason: str  # stop | length | abort
    seconds: float  # arrival to last token
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StepStats:
    """What the engine measured since the previous record: plain data for the HTTP process's
    Prometheus series and the fusion summary (the engine itself records no metrics).

    `steps` holds (phase, path, seconds) of each collected step whose latency is comparable
    (an eager, per-layer-timed step among CUDA-graph replays reports only its layers);
    `layers` holds (phase, path, layer, part, seconds) of sampled per-layer timings.
    """

    steps: list[tuple[str, str, float]] = field(default_factory=list)
    layers: list[tuple[str, str, int, str, float]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    preemptions: int = 0
    aborts: int = 0

    def is_empty(self) -> bool:
        return not (self.steps or self.layers or self.ttfts or self.itls or self.finished)


@dataclass
class EngineCoreOutputs:
    """One message from the core: a step's deltas, what it measured, and the state after it."""

    outputs: list[RequestOutput | tuple[str, Exception]]  # (request id, error) for a refused add
    step_stats: StepStats
    stats: EngineStats
    adds_seen: int  # ADD ops applied so far: the client's queue-full check counts the rest
    cpu_seconds: float  # the core's process CPU time (user + system)


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against before it is queued, so a bad one fails before its
    response starts (the core checks again when it adds it)."""

    vocab_size: int
    max_model_len: int
    has_tokenizer: bool

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError / RequestTooLongError for a request no engine of these limits can run."""
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        if any(not (0 <= int(t) < self.vocab_size) for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        if params.stop and not self.has_tokenizer:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestTooLongError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
            )


@dataclass(frozen=True)
class CoreInfo:
    """What a client learns about the engine its core built (sent once, when ready)."""

    model_name: str
    kernel_path: str
    limits: EngineLimits
    stats: EngineStats


class CoreEventKind(enum.Enum):
    READY = "ready"  # info: the engine is built and serving
    FAILED = "failed"  # reason: it could not be built (bad configuration)
    DEAD = "dead"  # reason: the loop crashed
    STOPPED = "stopped"  # after STOP: every request has its final output


@dataclass(frozen=True)
class CoreEvent:
    """A change of the core's life, sent besides the per-step EngineCoreOutputs."""

    kind: CoreEventKind
    info: CoreInfo | None = None
    reason: str = ""
