"""`fusionserve serve`: options, engine construction and a real uvicorn server.

Every option has a ``FUSIONSERVE_*`` environment variable as its default (containers and
Kubernetes configure through the environment). The engine process is supervised (docs/DESIGN.md,
"Engine supervision"): respawned when it dies, and the server exits with EXIT_ENGINE_FAILED when
it keeps dying. Shutdown follows docs/DESIGN.md, "Reliability":
the first SIGTERM/SIGINT stops admitting work (503) while in-flight requests finish
within ``--shutdown-timeout``; then the process exits with status 0. Plain uvicorn
re-raises the signal after its graceful shutdown (exit 143), so :class:`GracefulServer`
replaces its signal handling.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from fusionserve.server.contract import EngineConfig, EngineError
from fusionserve.server.engine.client import EngineClient
from fusionserve.server.engine.supervisor import EXIT_ENGINE_FAILED, RestartPolicy

log = logging.getLogger("fusionserve")


def _env(name: str, default: Any) -> Any:
    """The FUSIONSERVE_<NAME> value if set (argparse applies the option's type to it)."""
    return os.environ.get("FUSIONSERVE_" + name, default)


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get("FUSIONSERVE_" + name)
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off", "")


def _origin_list(text: str) -> tuple[str, ...]:
    """'https://a.example, https://b.example' → a tuple; '*' allows any origin."""
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin (scheme://host[:port], or '*')")
    return origins


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The `serve` options; each defaults to its FUSIONSERVE_* environment variable."""
    _add_model_args(p.add_argument_group("model"))
    _add_engine_args(p.add_argument_group("engine limits"))
    _add_http_args(p.add_argument_group("http"))


def _add_model_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--model", default=_env("MODEL", None), help="model folder or .gguf (default: SmolLM2-135M)"
    )
    g.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME", None), help="model id in the API")
    g.add_argument("--device", default=_env("DEVICE", "auto"), help="auto, cpu, cuda, cuda:N")
    g.add_argument(
        "--dtype", default=_env("DTYPE", "auto"), choices=("auto", "float32", "bfloat16", "float16")
    )
    g.add_argument(
        "--quantization",
        default=_env("QUANTIZATION", "auto"),
        choices=("auto", "fp8", "none"),
        help="fp8: e4m3 weights per channel + per-token e4m3 activations; auto: as the checkpoint says",
    )
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=int(_env("TENSOR_PARALLEL_SIZE", "1")),
        help="shard the model over N processes (GPUs on CUDA; it must divide the KV heads)",
    )
    g.add_argument("--backend", default=_env("BACKEND", "auto"), choices=("auto", "torch", "triton"))
    g.add_argument(
        "--fusion", default=_env("FUSION", "on"), choices=("on", "off", "ab"), help="deferred-norm path"
    )
    g.add_argument(
        "--layer-timing-every",
        type=int,
        default=_env("LAYER_TIMING_EVERY", 50),
        help="sample per-layer timing every N steps (0: off)",
    )


def _add_engine_args(e: argparse._ArgumentGroup) -> None:
    e.add_argument("--max-model-len", type=int, default=_env("MAX_MODEL_LEN", None))
    e.add_argument("--max-num-seqs", type=int, default=_env("MAX_NUM_SEQS", 64))
    e.add_argument("--max-num-batched-tokens", type=int, default=_env("MAX_NUM_BATCHED_TOKENS", 2048))
    e.add_argument(
        "--max-queue", type=int, default=_env("MAX_QUEUE", 256), help="waiting requests before 503"
    )
    e.add_argument("--kv-cache-gb", type=float, default=_env("KV_CACHE_GB", 1.0), help="KV cache size on CPU")
    e.add_argument("--gpu-memory-utilization", type=float, default=_env("GPU_MEMORY_UTILIZATION", 0.9))
    e.add_argument("--no-cuda-graphs", action="store_true", default=not _env_flag("CUDA_GRAPHS", True))
    e.add_argument("--no-prefix-caching", action="store_true", default=not _env_flag("PREFIX_CACHING", True))
    e.add_argument(
        "--scheduling-policy",
        default=_env("SCHEDULING_POLICY", "fcfs"),
        choices=("fcfs", "priority"),
        help="fcfs: first come, first served (a request's non-zero priority is refused); priority: "
        "lower 'priority' first, ties by arrival, and a waiting request may preempt running requests "
        "of a lower priority",
    )
    e.add_argument(
        "--engine-core",
        default=_env("ENGINE_CORE", "process"),
        choices=("process", "thread"),
        help="where the engine loop runs: its own process (default; no GIL shared with the HTTP "
        "streams) or a thread of the server process (one process: debugging, profiling)",
    )
    e.add_argument(
        "--gil-switch-ms",
        type=float,
        default=_env("GIL_SWITCH_MS", 0.5),
        help="Python's thread switch interval: how long a thread waiting for the GIL waits at most "
        "(with --engine-core thread the GPU idles meanwhile; Python's default is 5 ms)",
    )


def _add_http_args(h: argparse._ArgumentGroup) -> None:
    h.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    h.add_argument("--port", type=int, default=_env("PORT", 8000))
    h.add_argument(
        "--api-key", default=_env("API_KEY", None), help="require 'Authorization: Bearer KEY' on /v1/*"
    )
    h.add_argument("--admin-key", default=_env("ADMIN_KEY", None), help="enables /admin/fusion with this key")
    h.add_argument("--max-body-bytes", type=int, default=_env("MAX_BODY_BYTES", 8 * 1024 * 1024))
    h.add_argument(
        "--tool-call-parser",
        default=_env("TOOL_CALL_PARSER", "auto"),
        choices=("auto", "hermes", "llama3_json", "mistral"),
        help="how the model writes tool calls (auto: from its chat template; hermes for the default model)",
    )
    h.add_argument(
        "--allowed-origins",
        type=_origin_list,
        default=_env("ALLOWED_ORIGINS", ""),
        help="browser origins allowed to call the API (comma-separated, '*' for any); default: none, "
        "no CORS headers, so web pages cannot call the server",
    )
    h.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_env("SHUTDOWN_TIMEOUT", 30.0),
        help="seconds to finish in-flight requests",
    )
    h.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=("critical", "error", "warning", "info", "debug"),
    )


@dataclass(frozen=True)
class ShutdownPlan:
    """What the first signal does: stop admitting, then wait (bounded) for in-flight work."""

    begin_drain: Callable[[], None]
    wait_idle: Callable[[float], Awaitable[bool]]
    timeout_s: float


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains before exiting and does not re-raise the signal (exit 0).

    First SIGTERM/SIGINT: ``begin_drain`` (the app answers 503, the engine admits nothing),
    wait until the engine is idle or the timeout passes, then let uvicorn close connections.
    A second signal forces the exit.
    """

    def __init__(self, config: uvicorn.Config, plan: ShutdownPlan, ready_message: str) -> None:
        super().__init__(config)
        self.plan = plan
        self.ready_message = ready_message
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future[None] | None = None
        self.exit_code = 0

    def give_up(self, reason: str) -> None:
        """The engine is dead for good (any thread may call this): exit non-zero, so the container
        runtime or service manager restarts the whole server."""
        log.critical("exiting with status %d: %s", EXIT_ENGINE_FAILED, reason)
        self.exit_code = EXIT_ENGINE_FAILED
        self.should_exit = True

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info(self.ready_message)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not appending to self._captured_signals: uvicorn would re-raise it.
        if self.draining or self._loop is None:
            log.warning("second signal %s: exiting now", sig)
            self.should_exit = True
            self.force_exit = True
            return
        self.draining = True
        log.info("signal %s: draining (new requests get 503), up to %.0fs", sig, self.plan.timeout_s)
        self.plan.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        t0 = time.monotonic()
        try:
            idle = await self.plan.wait_idle(self.plan.timeout_s)
            if idle:
                log.info("in-flight requests finished in %.1fs", time.monotonic() - t0)
            else:
                log.warning("shutdown timeout: aborting requests still running")
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def engine_config(args: argparse.Namespace, model_dir: Path, name: str) -> EngineConfig:
    return EngineConfig(
        model_dir=str(model_dir),
        served_model_name=name,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size,
        backend=args.backend,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_queue=args.max_queue,
        enable_prefix_caching=not args.no_prefix_caching,
        fusion=args.fusion,
        layer_timing_every=args.layer_timing_every,
        cuda_graphs=not args.no_cuda_graphs,
        scheduling_policy=args.scheduling_policy,
    )


def start_engine(args: argparse.Namespace, config: EngineConfig) -> EngineClient:
    """The engine core where --engine-core puts it: its own process (default) or a thread here."""
    if args.engine_core == "process":
        from fusionserve.server.engine.process_client import ProcessEngineClient

        return ProcessEngineClient(
            config, switch_ms=args.gil_switch_ms, log_level=args.log_level, restart=RestartPolicy()
        )
    from fusionserve.server.engine.thread_client import ThreadEngineClient  # imports torch: computes here

    return ThreadEngineClient(config)


def run_serve(args: argparse.Namespace) -> int:
    """Build the engine, serve until a signal, drain, exit 0 (2 on bad configuration)."""
    _setup_logging(args.log_level)
    if args.gil_switch_ms > 0:
        sys.setswitchinterval(args.gil_switch_ms / 1e3)
    from fusionserve.models.registry import resolve_model
    from fusionserve.server.api.app import ServerSettings, create_app
    from fusionserve.server.api.metrics import ServerMetrics

    try:
        model_dir = resolve_model(args.model)
    except (FileNotFoundError, OSError) as exc:
        log.error("cannot load model: %s", exc)
        return 2
    if not (model_dir / "tokenizer.json").is_file():  # the API speaks text: ids alone cannot answer
        log.error(
            "cannot serve %s: it has no tokenizer.json (the OpenAI API needs the model's tokenizer; "
            "copy it beside the weights)",
            model_dir,
        )
        return 2
    name = args.served_model_name or model_dir.name
    log.info("loading %s from %s", name, model_dir)
    try:
        engine = start_engine(args, engine_config(args, model_dir, name))
    except (ValueError, FileNotFoundError, EngineError) as exc:
        log.error("cannot start the engine: %s", exc)
        return 2
    cpu = (lambda: engine.cpu_seconds) if args.engine_core == "process" else None
    metrics = ServerMetrics(
        model_name=name,
        fusion_mode=args.fusion,
        engine_cpu_seconds=cpu,
        engine_restarts=lambda: engine.restarts,
    )
    engine.listeners.append(metrics.record)
    engine.start()
    settings = ServerSettings(
        api_key=args.api_key or None,
        admin_key=args.admin_key or None,
        max_body_bytes=args.max_body_bytes,
        allowed_origins=args.allowed_origins,
        tool_call_parser=None if args.tool_call_parser == "auto" else args.tool_call_parser,
    )
    app = create_app(engine, settings, metrics=metrics)
    return _serve_until_signal(args, app, engine)


def _serve_until_signal(args: argparse.Namespace, app: Any, engine: EngineClient) -> int:
    def begin_drain() -> None:
        app.state.drain.draining = True
        engine.begin_drain()

    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="off",
        timeout_graceful_shutdown=5,  # the drain above already waited for in-flight work
        timeout_keep_alive=5,
    )
    url = f"http://{args.host}:{args.port}"
    ready = (
        f"fusionserve ready: {url}/v1 (model {engine.model_name}, fusion {args.fusion}, "
        f"max_model_len {engine.max_model_len} ({engine.max_model_len_why}), kernels: {engine.kernel_path})"
    )
    server = GracefulServer(
        uv_config, ShutdownPlan(begin_drain, engine.wait_idle, args.shutdown_timeout), ready
    )
    engine.on_give_up = server.give_up
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind the port
        code = exc.code if isinstance(exc.code, int) else 1
        return code or 0
    finally:
        engine.shutdown()
    if not server.started:
        return 1
    if server.exit_code:
        return server.exit_code
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusionserve serve")
    add_serve_args(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
