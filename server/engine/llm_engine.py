"""The engine: a synchronous, token-id based core (`LLMEngine`) and its asyncio front (`AsyncEngine`).

`LLMEngine.step()` runs one scheduler plan through the model and turns the
sampled ids into per-choice deltas (detokenized text with stop strings held back
and cut, finish reasons, logprobs, metrics). It needs no tokenizer unless a
request uses stop strings. `AsyncEngine` runs that loop on its own thread (the
thread owns the model and the KV cache) and talks to asyncio only through one
thread-safe operation queue and per-request asyncio queues. See server/CONTRACT.md.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fusionserve.models.decoder import Decoder, KVCache
from fusionserve.server.engine.block_manager import BlockManager
from fusionserve.server.engine.fusion import FusionControl, path_label
from fusionserve.server.engine.model_runner import ModelRunner
from fusionserve.server.engine.sampler import (
    SampleHandle,
    Sampler,
    SamplingParams,
    TokenLogprob,
    prompt_logprobs,
)
from fusionserve.server.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status

if TYPE_CHECKING:  # the engine runs without prometheus_client when no metrics are passed
    from fusionserve.server.api.metrics import ServerMetrics

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineShuttingDownError",
    "EngineStats",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "RequestTooLongError",
    "SamplingParams",
    "TokenLogprob",
]


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str | None = None  # None → fusionserve.models.registry.default_model_dir()
    served_model_name: str | None = None  # default: folder name
    device: str = "auto"  # auto → cuda if available else cpu
    dtype: str = "auto"  # auto → bf16 on cuda, fp32 on cpu
    backend: str = "auto"  # auto|torch|triton
    max_model_len: int | None = None  # default min(config max positions, 8192)
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
    num_kv_blocks: int | None = None  # overrides the memory-based sizing (tests, benchmarks)
    seed: int | None = None  # the shared generator of unseeded requests
    overlap: bool = True  # launch step n+1 before the text/output work of step n (off: debugging)


@dataclass
class RequestOutput:  # one per yield, a delta
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
    running: int
    waiting: int
    kv_usage: float
    preemptions: int
    prefix_hit_rate: float
    steps: int
    num_blocks: int = 0
    free_blocks: int = 0


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class QueueFullError(EngineError):
    """Too many waiting requests (HTTP 503 + Retry-After)."""


class RequestTooLongError(EngineError):
    """Prompt (+ max_tokens) over max_model_len (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop thread died or was shut down (HTTP 503)."""


class EngineShuttingDownError(EngineDeadError):
    """Draining: no new requests are admitted (HTTP 503)."""


# -- per-request state ------------------------------------------------------------------


class StopMatcher:
    """Cuts text at the first stop string, holding back any tail that may begin one.

    Text arrives in pieces that need not align with the stop strings, so a piece
    ending in a prefix of a stop string is held until the next piece decides.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        if not final:
            for k in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(buf[-k:]) for s in self.stops):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    seqs: list[Sequence] = field(default_factory=list)
    prompt_lps: list[TokenLogprob | None] | None = None
    first_token_at: float | None = None
    num_finished: int = 0
    finish_reason: str | None = None


@dataclass(eq=False)
class _Choice:
    """The engine's state for one sequence (Sequence.data)."""

    request: _Request
    index: int
    generator: torch.Generator | None
    detok: object | None  # fusionserve.models.tokenizer.IncrementalDetokenizer
    stops: StopMatcher | None
    new_ids: list[int] = field(default_factory=list)
    new_lps: list[TokenLogprob] = field(default_factory=list)
    new_text: str = ""
    sent_prompt_lps: bool = False
    last_token_at: float | None = None
    stop_reason: str | None = None  # decided when the token arrived (eos / stop id / length)
    finish_reason: str | None = None  # set once its text is processed


@dataclass
class _InFlight:
    """A launched step whose sampled ids are not on the host yet."""

    rows: list[Sequence]
    handle: SampleHandle | None
    fused: bool
    phase: str
    timer: object | None
    t0: float


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}")
    return table[name]


def kv_cache_blocks(config: EngineConfig, decoder: Decoder) -> int:
    """How many KV blocks fit: --kv-cache-gb on CPU; free GPU memory × utilization on CUDA.

    On CUDA this runs after the weights are loaded, and keeps a margin for the
    activations of the largest step (packed tokens × widest layer, plus logits).
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = KVCache.bytes_per_block(decoder.config, config.block_size, decoder.dtype)
    if decoder.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(decoder.device)
        cfg = decoder.config
        width = (
            2 * cfg.intermediate_size
            + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            + 4 * cfg.hidden_size
        )
        elem = torch.empty((), dtype=decoder.dtype).element_size()
        activations = config.max_num_batched_tokens * width * elem * 4
        activations += config.max_num_seqs * cfg.vocab_size * 4 * 4 + (256 << 20)
        budget = total * config.gpu_memory_utilization - (total - free) - activations
    else:
        budget = config.kv_cache_gb * (1 << 30)
    # Past every sequence at full length (x4 for the prefix cache) more blocks buy nothing but
    # allocator bookkeeping; a tiny model on a large GPU would otherwise get millions.
    useful = 4 * config.max_num_seqs * -(-decoder.max_model_len // config.block_size)
    n = min(int(budget // per_block), useful)
    if n < 1:
        raise EngineError(
            f"no room for the KV cache ({budget / 2**20:.0f} MiB available, {per_block} B per block)"
        )
    return n


def check_request(
    prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int, has_tokenizer: bool
) -> None:
    """Raise ValueError / RequestTooLongError for a request no engine of these limits can run; both
    fronts call it before a request is queued, so a bad one fails before its response starts."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if any(not (0 <= int(t) < vocab_size) for t in prompt_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    params.validate(vocab_size)
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this model has none")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise RequestTooLongError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"max_model_len ({max_model_len})"
        )


def load_tokenizer(model_dir: Path | None):
    if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    from fusionserve.models.tokenizer import Tokenizer

    return Tokenizer(model_dir)


class LLMEngine:
    """Synchronous engine core: add requests by token ids, call `step()` until idle."""

    def __init__(
        self,
        config: EngineConfig,
        metrics: ServerMetrics | None = None,
        decoder: Decoder | None = None,
        tokenizer: object | None = None,
    ):
        self.config = config
        self.metrics = metrics
        model_dir: Path | None = None
        if decoder is None:
            from fusionserve.models.registry import resolve_model

            model_dir = resolve_model(config.model_dir)
            device = _resolve_device(config.device)
            decoder = Decoder.from_pretrained(
                model_dir, device=device, dtype=_resolve_dtype(config.dtype, device),
                backend=config.backend, max_model_len=config.max_model_len,
            )  # fmt: skip
        elif config.model_dir is not None:
            model_dir = Path(config.model_dir)
        self.decoder = decoder
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        self.model_name = config.served_model_name or (model_dir.name if model_dir else "model")
        self.vocab_size = decoder.config.vocab_size
        num_blocks = kv_cache_blocks(config, decoder)
        bs = config.block_size
        self.max_model_len = min(config.max_model_len or 8192, decoder.max_model_len, num_blocks * bs)
        self.runner = ModelRunner(decoder, num_blocks, bs)
        graphs = config.cuda_graphs and decoder.device.type == "cuda"
        if graphs:
            sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < config.max_num_seqs]
            self.runner.capture_decode_graphs([*sizes, config.max_num_seqs])
            if config.layer_timing_every:
                self.runner.warm_eager_paths(config.max_num_seqs, self.max_model_len)
        # What the operator's start-up line says runs the steps (e.g. "triton on cuda, PDL, CUDA graphs").
        features = (["PDL"] if getattr(decoder.backend, "pdl", False) else []) + (
            ["CUDA graphs"] if graphs else []
        )
        self.kernel_path = ", ".join([f"{decoder.backend.name} on {decoder.device.type}", *features])
        self.blocks = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks
        )
        self.sampler = Sampler(decoder.device, config.seed)
        self.fusion = FusionControl(config.fusion, on_change=metrics.set_fusion_mode if metrics else None)
        if metrics is not None:
            metrics.set_fusion_mode(config.fusion)
        eos = getattr(self.tokenizer, "eos_token_ids", None) if self.tokenizer is not None else None
        self.eos_token_ids = frozenset(eos if eos is not None else decoder.config.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        self._path_steps = {True: 0, False: 0}
        self._seq_ids = itertools.count()
        self._inflight: deque[_InFlight] = deque()  # launched, ids not read yet (at most two)
        self._last_collect = 0.0

    # -- requests --------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError / RequestTooLongError for a request the engine cannot run."""
        check_request(prompt_ids, params, self.vocab_size, self.max_model_len, self.tokenizer is not None)

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate(prompt_ids, params)
        req = _Request(request_id, prompt_ids, params, time.monotonic() if arrival is None else arrival)
        if params.prompt_logprobs is not None:
            req.prompt_lps = [None]
        self.requests[request_id] = req
        leader = self._new_sequence(req, 0, list(prompt_ids))
        leader.pending_forks = params.n - 1
        self.scheduler.add(leader)

    def _new_sequence(self, req: _Request, index: int, tokens: list[int]) -> Sequence:
        p = req.params
        generator = None
        if p.seed is not None:
            generator = self.sampler.make_generator((p.seed * 1_000_003 + index) % (1 << 63))
        detok = None
        if self.tokenizer is not None:
            from fusionserve.models.tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, p.skip_special_tokens)
        seq = Sequence(
            seq_id=next(self._seq_ids), tokens=tokens, num_prompt=len(req.prompt_ids),
            use_prefix_cache=p.prompt_logprobs is None,
        )  # fmt: skip
        seq.data = _Choice(req, index, generator, detok, StopMatcher(p.stop) if p.stop else None)
        req.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Drop a request at once, freeing all its blocks; returns its final 'abort' outputs."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        outputs = []
        done = {seq.data.index for seq in req.seqs if seq.status is Status.FINISHED}
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq)
        for index in range(req.params.n):
            if index in done:
                continue
            seq = next((s for s in req.seqs if s.data.index == index), None)
            outputs.append(
                RequestOutput(request_id, index, "", [], [] if req.params.logprobs is not None else None, None,
                              True, "abort", len(req.prompt_ids), seq.num_output if seq else 0)
            )  # fmt: skip
        if self.metrics is not None:
            self.metrics.inc_aborts()
            self._observe_done(req, "abort")
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._inflight)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage, preemptions=self.scheduler.num_preemptions,
            prefix_hit_rate=self.blocks.prefix_hit_rate, steps=self.num_steps,
            num_blocks=self.blocks.num_blocks, free_blocks=self.blocks.num_free,
        )  # fmt: skip

    # -- one step --------------------------------------------------------------------
    #
    # A step is launched (schedule, prepare, execute, sampling kernels), then collected: its
    # sampled ids reach the host (the one wait) and only what the next schedule needs is done at
    # once (append, eos / stop token ids / max_tokens, freeing blocks). The slower per-token work
    # (detokenization, stop strings, logprob formatting, outputs) comes after. With `overlap`
    # step n+1 is launched *before* step n is collected (launch-ahead): its decodes read their
    # input ids, sampled by step n, on the device, so the GPU goes from step to step without
    # waiting for the host's schedule/prepare; all the host work of step n runs while n+1
    # computes. A sequence that step n finishes (eos, stop token) may sit in step n+1: its blocks
    # are freed when n is collected (later steps run after n+1 on the stream) and the extra token
    # is dropped when n+1 is collected; one cut by a stop string is treated the same way.

    def step(self) -> list[RequestOutput]:
        if not self.config.overlap:
            self._launch()
            done = self._collect()
            outputs = self._process(*done) if done is not None else []
        else:  # one call still returns the outputs of one step (the first call launches two)
            if not self._inflight:
                self._launch()
            ahead = self._launch_ahead()
            done = self._collect()
            if not ahead:
                self._launch()
            outputs = self._process(*done) if done is not None else []
        self.update_gauges()
        return outputs

    def _launch_ahead(self) -> bool:
        """Launch the next step while the one in flight still runs; False when it must wait for the ids.

        Each live row of the step in flight gets a placeholder token whose id the next step gathers
        on the device. Rows whose sampling reads the host's token history (penalties) need the real
        ids first; a row that reaches max_tokens / max_model_len with this token is held back.
        """
        if len(self._inflight) != 1:
            return False
        inf = self._inflight[0]
        live = [(i, s) for i, s in enumerate(inf.rows) if s.status is Status.RUNNING]
        if any(s.data.request.params.has_penalties for _, s in live):
            return False
        for i, seq in live:
            seq.pending_at, seq.pending_row = len(seq.tokens), i
            seq.tokens.append(-1)
            seq.hold = self._at_length_limit(seq)
        return self._launch(ahead_of=inf)

    def _launch(self, ahead_of: _InFlight | None = None) -> bool:
        """Schedule and queue one step on the device (model + sampling); no wait for its result.

        `ahead_of`: the step still in flight whose sampled ids this one's pending decodes read."""
        plan = self.scheduler.schedule()
        if plan.preempted and self.metrics is not None:
            self.metrics.inc_preemptions(len(plan.preempted))
        if not plan.items:
            return False
        fused = self.fusion.step_mode()
        # Count steps per path, so `ab` with an even interval still times both paths.
        every, self._path_steps[fused] = self.config.layer_timing_every, self._path_steps[fused] + 1
        timer = self.runner.make_timer() if every and (self._path_steps[fused] - 1) % every == 0 else None
        phase = "decode" if plan.is_decode else "prefill"
        t0 = time.perf_counter()

        want_prompt = [self._wants_prompt_rows(s) for s, _ in plan.items]
        starts = [s.num_computed for s, _ in plan.items]
        params = [s.data.request.params for s, _ in plan.items]
        # Plain greedy rows need no final-norm scale on the fused path (argmax is scale-invariant).
        scaled = not fused or any(want_prompt) or any(p.needs_scaled_logits for p in params)
        pending_ids = pending_rows = None
        if ahead_of is not None and ahead_of.handle is not None:
            pending_rows = []
            for seq, n in plan.items:
                if seq.pending_at >= 0:
                    # Only a running decode can hold a placeholder (a preempted one is not admitted).
                    assert n == 1 and seq.pending_at == seq.num_computed, "placeholder inside a chunk"
                pending_rows.append(seq.pending_row if seq.pending_at >= 0 else -1)
            pending_ids = ahead_of.handle.chosen
        inputs = self.runner.prepare(plan.items, want_prompt, pending_ids, pending_rows)
        logits = self.runner.execute(inputs, fused, timer, scaled)
        self.scheduler.advance(plan)

        rows: list[Sequence] = []
        src: list[int] = []
        for (seq, _), at in zip(plan.items, inputs.sample_index):
            if at is None:
                continue
            rows.append(seq)
            src.append(at)
            if seq.pending_forks:
                for child in self._fork(seq):
                    rows.append(child)
                    src.append(at)
        handle = None
        if rows:
            # The sampler may change its input in place: index (copy) when prompt rows share it.
            whole = len(src) == logits.shape[0] and src[-1] == len(src) - 1 and not any(want_prompt)
            handle = self.sampler.launch(
                logits if whole else logits[src], [s.data.request.params for s in rows],
                [s.data.generator for s in rows], lambda i: (rows[i].tokens, rows[i].num_prompt),
            )  # fmt: skip
        for (seq, _), span, start in zip(plan.items, inputs.prompt_index, starts):
            if span is not None:  # prompt logprobs (echo) wait for the device here: rare, prefill only
                self._add_prompt_logprobs(seq, logits[span[0] : span[0] + span[1]], start)
        self._inflight.append(_InFlight(rows, handle, fused, phase, timer, t0))
        return True

    def _collect(self) -> tuple[SampleHandle | None, list[tuple[Sequence, int, int]]] | None:
        """Wait for the oldest launched step's ids; account what the next schedule needs."""
        if not self._inflight:
            return None
        inf = self._inflight.popleft()
        token_ids = inf.handle.token_ids() if inf.handle is not None else []
        # Launched ahead, a step queues behind the previous one: its latency starts when that one ended.
        end = time.perf_counter()
        self._observe_step(inf.fused, inf.phase, end - max(inf.t0, self._last_collect), inf.timer)
        self._last_collect = end
        now = time.monotonic()
        metrics, eos = self.metrics, self.eos_token_ids
        done: list[tuple[Sequence, int, int]] = []
        itls: list[float] = []
        for i, (seq, tok) in enumerate(zip(inf.rows, token_ids)):
            if seq.pending_at >= 0:  # the placeholder a step launched ahead has read on the device
                seq.tokens[seq.pending_at] = tok
                seq.pending_at = seq.pending_row = -1
                seq.hold = False
            elif seq.status is not Status.FINISHED:
                seq.tokens.append(tok)
            if seq.status is Status.FINISHED:  # aborted, or cut by a stop string while in flight
                continue
            ch: _Choice = seq.data
            req, p = ch.request, ch.request.params
            ch.new_ids.append(tok)
            if metrics is not None:
                if req.first_token_at is None:
                    metrics.observe_ttft(now - req.arrival)
                elif ch.last_token_at is not None:
                    itls.append(now - ch.last_token_at)
            if req.first_token_at is None:
                req.first_token_at = now
            ch.last_token_at = now
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in eos):
                ch.stop_reason = "stop"
            elif self._at_length_limit(seq):
                ch.stop_reason = "length"
            if ch.stop_reason is not None:
                self.scheduler.finish(seq)
            done.append((seq, tok, i))
        if itls:
            metrics.observe_itls(itls)
        self.num_steps += 1
        return inf.handle, done

    def _at_length_limit(self, seq: Sequence) -> bool:
        """Its last token (placeholder or real) reaches max_tokens or max_model_len."""
        return seq.num_output >= seq.data.request.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _process(
        self, handle: SampleHandle | None, done: list[tuple[Sequence, int, int]]
    ) -> list[RequestOutput]:
        """The per-token host work of a collected step: logprobs, text, stop strings, outputs."""
        lps = handle.logprobs() if handle is not None and done else None
        outputs = []
        for seq, tok, i in done:
            ch: _Choice = seq.data
            if lps is not None and lps[i] is not None:
                ch.new_lps.append(lps[i])
            reason, hit = ch.stop_reason, False
            if reason != "stop":  # an eos / stop token id adds no text
                text = ch.detok.push(tok) if ch.detok is not None else ""
                if ch.stops is not None:
                    text, hit = ch.stops.feed(text)
                    if hit:
                        reason = "stop"
                ch.new_text += text
            if reason is not None and ch.finish_reason is None:
                self._finish(seq, reason, stopped_by_string=hit)
            outputs.append(self._emit(seq))
        return outputs

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """n>1: siblings share the leader's prompt blocks once its prompt is in the cache.

        A sibling that cannot get a block for its copy of the partly filled last
        block waits in the queue instead and recomputes (prefix cache permitting, cheaply).
        """
        req: _Request = leader.data.request
        children = []
        for index in range(1, leader.pending_forks + 1):
            child = self._new_sequence(req, index, list(leader.tokens))
            partial = leader.num_computed % self.blocks.block_size != 0
            if self.blocks.num_free >= int(partial):
                child.table, copy = self.blocks.fork(leader.table, leader.num_computed)
                if copy is not None:
                    self.runner.copy_block(*copy)
                child.num_computed = leader.num_computed
                self.scheduler.add_running(child)
                children.append(child)
            else:
                self.scheduler.add(child)
        leader.pending_forks = 0
        return children

    @staticmethod
    def _wants_prompt_rows(seq: Sequence) -> bool:
        """The leader of a prompt_logprobs request whose prompt rows are not all scored yet."""
        req: _Request = seq.data.request
        return (
            req.prompt_lps is not None
            and seq is req.seqs[0]
            and seq.num_computed < seq.num_prompt - 1
            and len(req.prompt_lps) < seq.num_prompt
        )

    def _add_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """Rows at positions start.. predict prompt tokens start+1..; keep those not scored yet
        (a sequence recomputed after preemption scores its prompt again)."""
        lps: list = seq.data.request.prompt_lps
        skip = len(lps) - (start + 1)
        if skip < 0 or skip >= logits.shape[0]:
            return
        next_ids = seq.tokens[len(lps) : start + 1 + logits.shape[0]]
        lps.extend(prompt_logprobs(logits[skip:], next_ids, seq.data.request.params.prompt_logprobs or 0))

    def _finish(self, seq: Sequence, reason: str, stopped_by_string: bool = False) -> None:
        ch: _Choice = seq.data
        if not stopped_by_string:  # release text held back for a partial character or stop string
            tail = ch.detok.flush() if ch.detok is not None else ""
            if ch.stops is not None:
                tail, _ = ch.stops.feed(tail, final=True)
            ch.new_text += tail
        ch.finish_reason = reason
        if seq.status is not Status.FINISHED:  # a stop string: it may sit in the launched step
            self.scheduler.finish(seq)
        req = ch.request
        req.num_finished += 1
        if ch.index == 0:
            req.finish_reason = reason
        if req.num_finished == req.params.n:
            self.requests.pop(req.request_id, None)
            self._observe_done(req, req.finish_reason or reason)

    def _emit(self, seq: Sequence) -> RequestOutput:
        ch: _Choice = seq.data
        req = ch.request
        prompt_lps = None
        if req.prompt_lps is not None and not ch.sent_prompt_lps:
            prompt_lps, ch.sent_prompt_lps = list(req.prompt_lps), True
        out = RequestOutput(
            request_id=req.request_id, index=ch.index, text=ch.new_text, token_ids=ch.new_ids,
            logprobs=ch.new_lps if req.params.logprobs is not None else None, prompt_logprobs=prompt_lps,
            finished=ch.finish_reason is not None, finish_reason=ch.finish_reason,
            prompt_tokens=seq.num_prompt, completion_tokens=seq.num_output,
        )  # fmt: skip
        ch.new_ids, ch.new_lps, ch.new_text = [], [], ""
        return out

    # -- metrics ---------------------------------------------------------------------

    def _observe_step(self, fused: bool, phase: str, seconds: float, timer) -> None:
        label = path_label(fused)
        # A timed step runs eagerly; where other decode steps replay CUDA graphs it would skew
        # the step latency of its path, so it reports only its per-layer times.
        if timer is None or self.runner.graphs is None:
            self.fusion.record_step(fused, phase, seconds)
            if self.metrics is not None:
                self.metrics.observe_step(phase, label, seconds)
        if timer is None:
            return
        for layer, part, secs in timer.results():
            self.fusion.record_layer(fused, phase, layer, part, secs)
            if self.metrics is not None:
                self.metrics.observe_layer(layer, part, phase, label, secs)

    def _observe_done(self, req: _Request, reason: str) -> None:
        if self.metrics is not None:
            completion = sum(s.num_output for s in req.seqs)
            self.metrics.observe_request_done(
                reason, time.monotonic() - req.arrival, len(req.prompt_ids), completion
            )

    def update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(len(self.scheduler.running), len(self.scheduler.waiting))
            self.metrics.set_kv_usage(self.blocks.usage)

    # -- convenience -----------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[RequestOutput]]:
        """Run requests to completion; per request, per choice, one merged output (tests, benchmarks)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        merged: dict[tuple[str, int], RequestOutput] = {}
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for out in self.step():
                merge_output(merged, out)
        return [[merged[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, plist)]


def merge_output(merged: dict[tuple[str, int], RequestOutput], out: RequestOutput) -> None:
    """Fold a delta into the accumulated output of its choice."""
    key = (out.request_id, out.index)
    acc = merged.get(key)
    if acc is None:
        merged[key] = RequestOutput(**{**out.__dict__, "token_ids": list(out.token_ids),
                                       "logprobs": list(out.logprobs) if out.logprobs is not None else None})  # fmt: skip
        return
    acc.text += out.text
    acc.token_ids.extend(out.token_ids)
    if out.logprobs is not None and acc.logprobs is not None:
        acc.logprobs.extend(out.logprobs)
    acc.prompt_logprobs = acc.prompt_logprobs or out.prompt_logprobs
    acc.finished, acc.finish_reason = out.finished, out.finish_reason
    acc.completion_tokens = out.completion_tokens


# -- asyncio fronts ----------------------------------------------------------------------


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class StreamFront:
    """What both asyncio fronts share: a request's deltas reach its consumer through an asyncio queue
    that another thread (the engine loop here, the pipe reader of server/engine_process.py) fills.

    Subclasses say how a request is checked and submitted (`_admit`, `_submit`, `abort`) and
    whether their engine still runs (`_engine_running`); see server/CONTRACT.md.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._error: BaseException | None = None

    def begin_drain(self) -> None:
        self._draining = True

    def _has_streams(self) -> bool:
        with self._lock:
            return bool(self._streams)

    def _engine_running(self) -> bool:
        raise NotImplementedError

    def _idle(self) -> bool:
        """No consumer waits and the engine holds no request."""
        raise NotImplementedError

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight (within `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle():
                return True
            await asyncio.sleep(0.02)
        return False

    def _admit(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise for a request this engine cannot take now (bad input, too long, queue full)."""
        raise NotImplementedError

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _check_accepting(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        if not self._engine_running():
            raise EngineDeadError("engine is stopped")
        if self._draining:
            raise EngineShuttingDownError("server is shutting down")

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request; leaving the iteration early aborts it and frees its blocks."""
        self._check_accepting()
        prompt_ids = [int(t) for t in prompt_ids]
        self._admit(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
        finished: set[int] = set()
        try:
            self._submit(request_id, prompt_ids, params, time.monotonic())
            while len(finished) < params.n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finished.add(item.index)
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if len(finished) < params.n:
                self.abort(request_id)

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs to their consumers with one wake-up per event loop, not one per
        request: each call_soon_threadsafe writes the loop's self-pipe and invites a GIL hand-off,
        and 256 of them per step kept the engine thread (and so the GPU) waiting."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the consumer's event loop is closed
                pass

    def _fail_all(self, exc: BaseException) -> None:
        """Every waiting consumer gets `exc` (the engine died)."""
        with self._lock:
            rids = list(self._streams)
        self._deliver_all([(rid, exc) for rid in rids])


class AsyncEngine(StreamFront):
    """The engine loop on a thread of this process, fed through a thread-safe queue; see
    server/CONTRACT.md. Simple and what the tests drive; the server runs EngineProcess by default."""

    WEDGED_AFTER_S = 120.0  # a loop iteration longer than this counts as wedged

    def __init__(
        self,
        config: EngineConfig,
        metrics: ServerMetrics | None = None,
        *,
        engine: LLMEngine | None = None,
    ):
        super().__init__(config)
        self.engine = engine if engine is not None else LLMEngine(config, metrics)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.kernel_path = self.engine.kernel_path
        self.fusion = self.engine.fusion
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()
        self._busy = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fusionserve-engine", daemon=True)
        self._thread.start()

    def _engine_running(self) -> bool:
        return not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

    def is_alive(self) -> bool:
        if self._thread is None or self._error is not None or not self._engine_running():
            return False
        return not self._busy or time.monotonic() - self._beat < self.WEDGED_AFTER_S

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def _idle(self) -> bool:
        return not self._has_streams() and not self.engine.has_unfinished() and self._ops.empty()

    def shutdown(self) -> None:
        """Stop the loop thread; every request still in flight finishes with 'abort'."""
        self._draining = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- requests --------------------------------------------------------------------

    def _admit(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_ids, params)
        if len(self.engine.scheduler.waiting) + self._ops.qsize() >= self.config.max_queue:
            raise QueueFullError(f"{self.config.max_queue} requests are already waiting")

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float) -> None:
        self._ops.put(("add", request_id, prompt_ids, params, arrival))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._ops.put(("abort", request_id))
        self._wake.set()

    # -- the loop thread --------------------------------------------------------------

    def _apply_ops(self) -> None:
        eng = self.engine
        delivered: list[tuple[str, RequestOutput | BaseException]] = []
        while True:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            if op[0] == "add":
                _, rid, prompt, params, arrival = op
                with self._lock:
                    live = rid in self._streams
                if not live:  # the consumer already left
                    continue
                try:
                    eng.add_request(rid, prompt, params, arrival)
                except Exception as exc:  # validated already; a race (duplicate id) lands here
                    delivered.append((rid, exc))
            else:
                delivered.extend((out.request_id, out) for out in eng.abort_request(op[1]))
        if delivered:
            self._deliver_all(delivered)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                self._apply_ops()
                if not eng.has_unfinished():
                    if self._wake.wait(0.5):
                        self._wake.clear()
                    continue
                self._busy = True
                outputs = eng.step()
                self._busy = False
                if outputs:
                    self._deliver_all([(out.request_id, out) for out in outputs])
        except BaseException as exc:  # noqa: BLE001 - any death must reach every waiting consumer
            self._error = exc
            self._fail_all(EngineDeadError(f"engine loop died: {exc!r}"))
            raise
        finally:
            self._busy = False
            try:
                self._deliver_all(
                    [(o.request_id, o) for rid in list(eng.requests) for o in eng.abort_request(rid)]
                )
            except Exception:  # noqa: BLE001 - state may be broken after a crash; consumers were told
                pass
