"""The contract between the two rooms: what crosses from the HTTP process (api/) to the engine core
(engine/) and back. Plain, picklable, torch-free data: the HTTP process imports only this from the
engine side's vocabulary, and both placements of the core (a thread, or a process behind two pipes)
speak it. vLLM v1's EngineCoreRequest / EngineCoreOutputs are the model.

The client sends `CoreOp`s in order (ADD carries an `EngineCoreRequest`) and receives one
`EngineCoreOutputs` per step (the deltas, a `StepStats` record of what was measured, the
`EngineStats` after it) plus `CoreEvent`s when the core's life changes. See docs/DESIGN.md.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str | None = None  # None → models.registry.default_model_dir()
    served_model_name: str | None = None  # default: folder name
    device: str = "auto"  # auto → cuda if available else cpu
    dtype: str = "auto"  # auto → bf16 on cuda, fp32 on cpu
    quantization: str = "auto"  # auto: the checkpoint's (compressed-tensors FP8 or none); fp8; none
    tensor_parallel_size: int = 1  # ranks the model is sharded over (models/tp_group.py)
    backend: str = "auto"  # auto|torch|triton
    max_model_len: int | None = None  # default: the model's context, or all the KV cache holds
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gb: float = 1.0  # CPU sizing
    gpu_memory_utilization: float = 0.9  # GPU sizing
    max_queue: int = 256  # waiting requests beyond this → QueueFullError
    enable_prefix_caching: bool = True
    fusion: str = "on"  # on|off|ab
    layer_timing_every: int = 50  # 0 disables per-layer timing
    cuda_graphs: bool = True
    flash_sampling: bool = True  # fused steps of plain rows draw their tokens in the LM head
    num_kv_blocks: int | None = None  # overrides the memory-based sizing (tests, benchmarks)
    seed: int | None = None  # the shared generator of unseeded requests
    overlap: bool = True  # launch step n+1 before the text/output work of step n (off: debugging)
    scheduling_policy: str = "fcfs"  # fcfs | priority (vLLM's meaning: lower priority value first)


# -- requests --------------------------------------------------------------------------------------

GREEDY_EPS = 1e-5  # temperatures below this are greedy


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 → disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob + top-k
    prompt_logprobs: int | None = None  # for completions echo+logprobs
    n: int = 1
    skip_special_tokens: bool = True
    #: An llguidance grammar (JSON schema, regex, choice, Lark, tool calls) the output must match;
    #: built and validated by the HTTP side (server/api/structured_output.py).
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def lm_head_draws(self) -> bool:
        """The LM head's epilogue can draw this row's token itself (FlashSampling): greedy or plain
        temperature sampling, nothing that filters, changes or reports the logits row."""
        plain = self.greedy or (self.top_k <= 0 and self.top_p >= 1.0 and not self.min_p)
        return (
            plain
            and not self.has_penalties
            and not self.logit_bias
            and self.logprobs is None
            and self.grammar is None
        )

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_host_ids(self) -> bool:
        """Sampling reads the host's copy of the generated ids (penalties, a grammar's state), so a
        step cannot sample this row before the previous step's ids are collected."""
        return self.has_penalties or self.grammar is not None

    @property
    def needs_scaled_logits(self) -> bool:
        """False when the row's answer is an argmax of unmodified logits (scale-invariant)."""
        return not self.greedy or self.has_penalties or bool(self.logit_bias) or self.logprobs is not None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError for parameters no sampler could honour (the HTTP layer checks first)."""
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty), "repetition_penalty must be > 0"),
            (math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty), "penalties must be finite"),
            (self.n >= 1, "n must be >= 1"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs must be >= 0"),
            (all(math.isfinite(b) for _, b in self.logit_bias), "logit_bias values must be finite"),
        ]  # fmt: skip
        if vocab_size is not None:
            checks.append(
                (all(0 <= t < vocab_size for t, _ in self.logit_bias), "logit_bias token id out of range")
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-k (id, logprob), best first


# -- errors ----------------------------------------------------------------------------------------


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class QueueFullError(EngineError):
    """Too many waiting requests (HTTP 503 + Retry-After)."""


class RequestTooLongError(EngineError):
    """Prompt (+ max_tokens) over max_model_len (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop died or was shut down (HTTP 503)."""


class EngineShuttingDownError(EngineDeadError):
    """Draining: no new requests are admitted (HTTP 503)."""


class EngineStartError(EngineError):
    """The engine could not load the model or size its cache (bad configuration)."""


# -- messages --------------------------------------------------------------------------------------


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
    priority: int = 0  # --scheduling-policy priority: lower first


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
    max_model_len_why: str = ""  # for the ready line: "the model's full context", ...


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
