"""Every Prometheus metric of fusionserve, defined once (docs/DESIGN.md, "Metrics").

Recorded only in the HTTP process: the engine core sends plain StepStats records with each
step's outputs and `record` turns them into series here. One :class:`ServerMetrics` instance owns
one :class:`CollectorRegistry`; nothing here is a module-level global, so tests (and several
servers in one process) can create as many instances as they like.

Names, types and labels are a contract with ``deploy/`` (the Grafana dashboard,
the Prometheus alert rules and the Kubernetes HPA): ``tests/test_deploy.py``
checks that every metric those files query is exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from fusionserve.server.contract import EngineCoreOutputs, EngineStats, StepStats

PREFIX = "fusionserve_"

LAYER_LATENCY = PREFIX + "layer_latency_seconds"
STEP_LATENCY = PREFIX + "step_latency_seconds"
TTFT = PREFIX + "time_to_first_token_seconds"
ITL = PREFIX + "inter_token_latency_seconds"
E2E_LATENCY = PREFIX + "e2e_request_latency_seconds"
PROMPT_TOKENS = PREFIX + "prompt_tokens_total"
GENERATION_TOKENS = PREFIX + "generation_tokens_total"
REQUESTS = PREFIX + "requests_total"
REQUESTS_RUNNING = PREFIX + "requests_running"
REQUESTS_WAITING = PREFIX + "requests_waiting"
KV_CACHE_USAGE = PREFIX + "kv_cache_usage_ratio"
PREEMPTIONS = PREFIX + "preemptions_total"
ABORTS = PREFIX + "aborts_total"
FUSION_MODE = PREFIX + "fusion_mode"
#: CPU time of the engine process (--engine-core process), as its last message reported it
ENGINE_PROCESS_CPU = PREFIX + "engine_process_cpu_seconds_total"
#: Engine processes respawned by the supervisor after a death (server/engine/supervisor.py)
ENGINE_RESTARTS = PREFIX + "engine_restarts_total"

#: Every exported base name, as PromQL refers to it (histograms without their
#: ``_bucket``/``_sum``/``_count`` suffixes, counters with ``_total``).
METRIC_NAMES: tuple[str, ...] = (
    LAYER_LATENCY,
    STEP_LATENCY,
    TTFT,
    ITL,
    E2E_LATENCY,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUESTS,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    KV_CACHE_USAGE,
    PREEMPTIONS,
    ABORTS,
    FUSION_MODE,
    ENGINE_PROCESS_CPU,
    ENGINE_RESTARTS,
)

LAYER_PARTS = ("attn", "mlp", "block")
PHASES = ("prefill", "decode")
FUSION_PATHS = ("on", "off")  # the path a timed step actually ran
FUSION_MODES = ("on", "off", "ab")  # the server's configured mode


def log_buckets(lo: float, hi: float, per_decade: int = 4) -> tuple[float, ...]:
    """Log-spaced bucket bounds from ``lo`` to at least ``hi`` (3 significant digits)."""
    if not (0 < lo < hi):
        raise ValueError("need 0 < lo < hi")
    n = math.ceil(round(math.log10(hi / lo) * per_decade, 9))
    out: list[float] = []
    for i in range(n + 1):
        v = float(f"{lo * 10 ** (i / per_decade):.3g}")
        if not out or v > out[-1]:
            out.append(v)
    if out[-1] < hi:
        out.append(float(hi))
    return tuple(out)


# Layer halves of the 135M default model take a few µs; 8B blocks at prefill
# take tens of ms.
LAYER_BUCKETS = log_buckets(10e-6, 0.1)
# One engine step: ~0.3 ms (135M decode in a CUDA graph) .. seconds (long
# prefill chunks on CPU).
STEP_BUCKETS = log_buckets(100e-6, 10.0)
# Time to first token / whole request: ms .. two minutes.
REQUEST_BUCKETS = log_buckets(1e-3, 100.0) + (120.0,)
# Inter-token latency: 1 ms .. 10 s.
ITL_BUCKETS = log_buckets(1e-3, 10.0)


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


class ServerMetrics:
    """The server's metrics on their own registry, plus the helpers the engine calls."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        model_name: str = "SmolLM2-135M-Instruct",
        fusion_mode: str = "on",
        process_metrics: bool | None = None,
        engine_cpu_seconds: Callable[[], float] | None = None,
        engine_restarts: Callable[[], int] | None = None,
    ) -> None:
        """`engine_cpu_seconds`: the engine process's CPU time (ProcessEngineClient.cpu_seconds),
        exported as fusionserve_engine_process_cpu_seconds_total so one scrape shows both
        processes (one engine thread near 1 CPU core starves the GPU). `engine_restarts`: how
        often the supervisor respawned a dead engine (fusionserve_engine_restarts_total)."""
        own = registry is None
        self.registry = CollectorRegistry() if own else registry
        self.model_name = model_name
        if process_metrics if process_metrics is not None else own:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        if engine_cpu_seconds is not None:
            self.registry.register(
                _ReadAtScrape(
                    ENGINE_PROCESS_CPU, "CPU time (user + system) of the engine process.", engine_cpu_seconds
                )
            )
        if engine_restarts is not None:
            self.registry.register(
                _ReadAtScrape(ENGINE_RESTARTS, "Engine processes respawned after a death.", engine_restarts)
            )
        self._define_latencies(self.registry)
        self._define_counts(self.registry)

        # Series that exist from the first scrape, so dashboards show zeros rather than "no data".
        for child in (self.ttft, self.itl, self.prompt_tokens, self.generation_tokens):
            child.labels(model=model_name)
        # Per-token series, bound once: labels() costs as much as observe() (~2 µs), paid 2x per token.
        self._ttft_child = self.ttft.labels(model=model_name)
        self._itl_child = self.itl.labels(model=model_name)
        self.set_fusion_mode(fusion_mode)

    def _define_latencies(self, r: CollectorRegistry) -> None:

        self.layer_latency = Histogram(
            LAYER_LATENCY,
            "Sampled wall time of one decoder layer part (attn, mlp or whole block) in one step.",
            ["layer", "part", "phase", "fusion"],
            buckets=LAYER_BUCKETS,
            registry=r,
        )
        self.step_latency = Histogram(
            STEP_LATENCY,
            "Wall time of one engine step (model forward + sampling; from the previous step's end when "
            "launched ahead) by phase and fusion path.",
            ["phase", "fusion"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            TTFT,
            "Time from request arrival to its first generated token.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            ITL,
            "Time between consecutive generated tokens of one request.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            E2E_LATENCY,
            "Time from request arrival to its last token.",
            ["model", "finish_reason"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )

    def _define_counts(self, r: CollectorRegistry) -> None:
        # prometheus_client appends "_total" to counter names itself.
        self.prompt_tokens = Counter(
            PROMPT_TOKENS.removesuffix("_total"),
            "Prompt tokens processed (of finished requests).",
            ["model"],
            registry=r,
        )
        self.generation_tokens = Counter(
            GENERATION_TOKENS.removesuffix("_total"),
            "Tokens generated (of finished requests).",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            REQUESTS.removesuffix("_total"),
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.requests_running = Gauge(
            REQUESTS_RUNNING, "Sequences currently scheduled (holding KV blocks).", registry=r
        )
        self.requests_waiting = Gauge(REQUESTS_WAITING, "Requests queued, not yet scheduled.", registry=r)
        self.kv_cache_usage = Gauge(KV_CACHE_USAGE, "Fraction of KV-cache blocks in use (0..1).", registry=r)
        self.preemptions = Counter(
            PREEMPTIONS.removesuffix("_total"),
            "Sequences preempted (KV blocks freed, recomputed later).",
            registry=r,
        )
        self.aborts = Counter(
            ABORTS.removesuffix("_total"),
            "Requests aborted before finishing (client disconnect, shutdown, error).",
            registry=r,
        )
        self.fusion_mode = Gauge(
            FUSION_MODE,
            "Configured deferred-norm fusion mode: 1 for the active mode, 0 for the others.",
            ["mode"],
            registry=r,
        )

    # -- engine ---------------------------------------------------------------

    def observe_layer(self, layer: int, part: str, phase: str, fusion: str, seconds: float) -> None:
        """One sampled per-layer timing (``part``: attn|mlp|block; ``fusion``: on|off path taken)."""
        self.layer_latency.labels(
            layer=str(int(layer)),
            part=_check(part, LAYER_PARTS, "part"),
            phase=_check(phase, PHASES, "phase"),
            fusion=_check(fusion, FUSION_PATHS, "fusion"),
        ).observe(seconds)

    def observe_step(self, phase: str, fusion: str, seconds: float) -> None:
        self.step_latency.labels(
            phase=_check(phase, PHASES, "phase"), fusion=_check(fusion, FUSION_PATHS, "fusion")
        ).observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft_child.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self._itl_child.observe(seconds)

    def observe_itls(self, seconds: list[float]) -> None:
        """A step's inter-token latencies (one per sequence that got a token)."""
        observe = self._itl_child.observe
        for s in seconds:
            observe(s)

    def observe_request_done(
        self, finish_reason: str, seconds: float, prompt_tokens: int, generation_tokens: int
    ) -> None:
        """A request finished (``finish_reason``: stop|length|abort|...): latency and its token counts."""
        self.e2e_latency.labels(model=self.model_name, finish_reason=str(finish_reason)).observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.labels(model=self.model_name).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(model=self.model_name).inc(generation_tokens)

    def set_queue(self, running: int, waiting: int) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def set_kv_usage(self, ratio: float) -> None:
        self.kv_cache_usage.set(min(max(float(ratio), 0.0), 1.0))

    def inc_preemptions(self, n: int = 1) -> None:
        if n:
            self.preemptions.inc(n)

    def inc_aborts(self, n: int = 1) -> None:
        if n:
            self.aborts.inc(n)

    # -- HTTP -----------------------------------------------------------------

    def count_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def set_fusion_mode(self, mode: str) -> None:
        _check(mode, FUSION_MODES, "fusion mode")
        for m in FUSION_MODES:
            self.fusion_mode.labels(mode=m).set(1.0 if m == mode else 0.0)

    def record(self, outs: EngineCoreOutputs) -> None:
        """One message of the engine core: its step's measurements and the gauges after it."""
        self.record_step_stats(outs.step_stats)
        self.set_engine_gauges(outs.stats)

    def set_engine_gauges(self, stats: EngineStats) -> None:
        """Running / waiting requests and KV usage as of an EngineStats (after a step, or at scrape time)."""
        self.set_queue(stats.running, stats.waiting)
        self.set_kv_usage(stats.kv_usage)

    def record_step_stats(self, st: StepStats) -> None:
        for phase, path, seconds in st.steps:
            self.observe_step(phase, path, seconds)
        for phase, path, layer, part, seconds in st.layers:
            self.observe_layer(layer, part, phase, path, seconds)
        for seconds in st.ttfts:
            self.observe_ttft(seconds)
        self.observe_itls(st.itls)
        for done in st.finished:
            self.observe_request_done(done.reason, done.seconds, done.prompt_tokens, done.completion_tokens)
        self.inc_preemptions(st.preemptions)
        self.inc_aborts(st.aborts)

    def render(self) -> tuple[bytes, str]:
        """The exposition for ``GET /metrics``: (body, content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ReadAtScrape:
    """A collector: one counter owned by another object, read at scrape time."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name, self.doc, self.read = name.removesuffix("_total"), doc, read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc)
        family.add_metric([], self.read())
        yield family
