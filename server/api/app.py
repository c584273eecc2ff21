"""FastAPI app factory: state, error handlers, request counting and the routers. No engine logic
lives here; the routes are in api/routes/, the OpenAI shapes in openai_serving.py and protocol.py.

``create_app(engine, settings, metrics)`` wires an EngineClient (docs/DESIGN.md, "Engine client")
to the OpenAI-compatible HTTP API.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusionserve.server.api.errors import install_error_handlers
from fusionserve.server.api.fusion import FusionSwitch
from fusionserve.server.api.metrics import ServerMetrics
from fusionserve.server.api.openai_serving import Serving
from fusionserve.server.api.routes import generate, operations, tokens
from fusionserve.server.api.state import AppState, ServerSettings

__all__ = ["ENDPOINTS", "ServerSettings", "create_app"]

#: Paths counted in requests_total under their own label; anything else is "other",
#: so scanners probing random URLs cannot blow up the label cardinality.
ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/health",
    "/livez",
    "/version",
    "/metrics",
    "/admin/fusion",
)


class CountRequests:
    """Pure-ASGI middleware: requests_total{endpoint,status} from the status actually sent.

    Pure ASGI (not BaseHTTPMiddleware) so streaming and disconnect detection pass through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = (
            path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        )
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.count_request(endpoint, status["code"])


def create_app(
    engine: Any, settings: ServerSettings | None = None, metrics: ServerMetrics | None = None
) -> FastAPI:
    """The HTTP app for a started engine client. The caller wires `metrics.record` to the client's
    listeners (serve.py does); a fresh ServerMetrics is made when none is given."""
    settings = settings or ServerSettings()
    metrics = metrics or ServerMetrics(model_name=engine.model_name)
    app = FastAPI(title="fusionserve", version=settings.version, docs_url=None, redoc_url=None)
    state = AppState(
        engine,
        settings,
        metrics,
        Serving(engine, engine.model_name, settings.tool_call_parser),
        FusionSwitch(engine),
    )
    app.state.fusionserve = state
    app.state.drain = state.drain  # serve.py's shutdown flips it
    app.add_middleware(CountRequests, metrics=metrics)
    if settings.allowed_origins:  # added last = outermost: preflights are answered before auth
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    install_error_handlers(app, settings.retry_after_s)
    for module in (generate, tokens, operations):
        app.include_router(module.router)
    return app
