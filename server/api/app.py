"""FastAPI app factory: routes, auth, error mapping. No engine logic lives here.

``create_app(engine, settings)`` wires an :class:`AsyncEngine` (server/CONTRACT.md)
to the OpenAI-compatible HTTP API of DESIGN.md section 5. Request bodies are read
and validated by hand (size limit, strict UTF-8, no NaN/Infinity, pydantic models
from fusionserve.server.api.protocol) so that every bad input maps to a 4xx with the OpenAI error
envelope and never reaches the engine.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusionserve import __version__
from fusionserve.server.api.disconnect import ClientDisconnected, SSEResponse, race_disconnect
from fusionserve.server.api.metrics import ServerMetrics
from fusionserve.server.api.openai_serving import Primed, Serving, sse
from fusionserve.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FusionRequest,
    ProtocolError,
    TokenizeRequest,
    check_strings,
    check_token_ids,
    error_body,
    now,
)

log = logging.getLogger("fusionserve.http")
M = TypeVar("M", bound=BaseModel)

#: Paths counted in requests_total under their own label; anything else is "other",
#: so scanners probing random URLs cannot blow up the label cardinality.
ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/health",
    "/version",
    "/metrics",
    "/admin/fusion",
)

#: HTTP status for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-layer settings (engine settings live in EngineConfig)."""

    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    version: str = __version__


class DrainState:
    """Set when a shutdown signal arrives: new work gets 503 while in-flight work finishes."""

    def __init__(self) -> None:
        self.draining = False


# -- errors ---------------------------------------------------------------------------------------


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _protocol_error_response(exc: ProtocolError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic puts union-branch names (e.g. "str", "list[int]") in the loc: keep real field names.
    out = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}[{p}]"
        elif any(c in p for c in "[](),") or p in ("str", "int", "float", "bool", "function-after"):
            continue
        else:
            out.append(p)
    return ".".join(out) or None


def validation_error(errors: list[dict[str, Any]]) -> ProtocolError:
    """Summarise pydantic errors as OpenAI does: one message, the first offending param."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _loc_param(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        return ProtocolError(
            f"Unrecognized request argument supplied: {param}", param=param, code="unrecognized_argument"
        )
    msgs = []
    for e in errors[:3]:
        p = _loc_param(tuple(e.get("loc", ())))
        msgs.append(f"{p}: {e.get('msg')}" if p else str(e.get("msg")))
    return ProtocolError("; ".join(msgs)[:500], param=param, code="invalid_value")


def engine_error(exc: BaseException, retry_after_s: int) -> ProtocolError | None:
    """Map the engine's errors (server/CONTRACT.md) to HTTP errors; None if not an engine error.

    Matched by class name so this module need not import fusionserve.server.engine.llm_engine (and torch) at all.
    """
    names = {c.__name__ for c in type(exc).__mro__}
    retry = {"Retry-After": str(retry_after_s)}
    if "QueueFullError" in names:
        return ProtocolError(
            "The server is overloaded: too many requests waiting. Retry later.",
            status=503,
            type="service_unavailable_error",
            code="queue_full",
            headers=retry,
        )
    if "RequestTooLongError" in names:
        return ProtocolError(str(exc)[:500], param="messages", code="context_length_exceeded")
    if "EngineDeadError" in names:
        return ProtocolError(
            "The engine is not available (shutting down or failed).",
            status=503,
            type="service_unavailable_error",
            code="engine_unavailable",
            headers=retry,
        )
    if isinstance(exc, ValueError):
        return ProtocolError(str(exc)[:500], code="invalid_value")
    return None


# -- middleware -----------------------------------------------------------------------------------


class CountRequests:
    """Pure-ASGI middleware: requests_total{endpoint,status} from the status actually sent.

    Pure ASGI (not BaseHTTPMiddleware) so streaming and disconnect detection pass through
    untouched.
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


# -- body parsing ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not a valid JSON number (only finite numbers are allowed)")


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """Read, size-limit, decode and validate a JSON body into ``model``."""
    too_big = ProtocolError(
        f"Request body is larger than the limit of {max_bytes} bytes",
        status=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise too_big
        except ValueError:
            raise ProtocolError("invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ProtocolError("The request body is empty; a JSON object is required", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("The request body is not valid UTF-8", code="invalid_json") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise ProtocolError("JSON nesting is too deep", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ProtocolError("The request body must be a JSON object", code="invalid_json")
    check_strings(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False)) from None


# -- the app --------------------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def create_app(
    engine: Any,
    settings: ServerSettings | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The HTTP app for a started engine.

    ``metrics`` defaults to the engine's own ServerMetrics (so engine-side and HTTP-side series
    share one registry).
    """
    settings = settings or ServerSettings()
    metrics = metrics or getattr(engine, "metrics", None) or ServerMetrics(model_name=engine.model_name)
    serving = Serving(engine, engine.model_name)
    drain = DrainState()

    app = FastAPI(title="fusionserve", version=settings.version, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.drain = drain
    app.add_middleware(CountRequests, metrics=metrics)

    # -- error handlers -----------------------------------------------------------------------

    @app.exception_handler(ProtocolError)
    async def _protocol(_: Request, exc: ProtocolError) -> JSONResponse:
        return _protocol_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _protocol_error_response(validation_error(list(exc.errors())))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"The request body is not valid JSON: {exc.msg}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        typ = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        msg = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            msg = "Not found"
        return error_response(exc.status_code, msg, typ, headers=getattr(exc, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        # Registered apart from Exception: Starlette re-raises (and logs) whatever reaches the
        # catch-all handler, and a ValueError from parameter checks is the client's fault.
        return _protocol_error_response(ProtocolError(str(exc)[:500], code="invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        mapped = engine_error(exc, settings.retry_after_s)
        if mapped is not None:
            return _protocol_error_response(mapped)
        log.exception("internal error")
        return error_response(500, "Internal server error", "server_error")

    # -- guards -------------------------------------------------------------------------------

    def check_api_key(request: Request) -> None:
        if settings.api_key is not None and not _key_matches(_bearer(request), settings.api_key):
            raise ProtocolError(
                "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    def check_accepting() -> None:
        if drain.draining:
            raise ProtocolError(
                "The server is shutting down",
                status=503,
                type="service_unavailable_error",
                code="shutting_down",
                headers={"Retry-After": str(settings.retry_after_s)},
            )

    def check_admin(request: Request) -> None:
        if not settings.admin_key:
            raise ProtocolError(
                "The admin API is disabled: start the server with --admin-key",
                status=403,
                type="permission_error",
                code="admin_disabled",
            )
        if not _key_matches(_bearer(request), settings.admin_key):
            raise ProtocolError(
                "Invalid or missing admin key",
                status=401,
                type="authentication_error",
                code="invalid_admin_key",
            )

    # -- generation ---------------------------------------------------------------------------

    async def run_generation(
        request: Request, jobs: list[Any], stream: bool, full: Any, streamer: Any
    ) -> Response:
        """Prime the engine requests, then answer (JSON or SSE), aborting on disconnect."""
        ids = [j.request_id for j in jobs]

        def abort() -> None:
            serving.abort(ids)

        try:
            primed: Primed = await race_disconnect(request.receive, serving.prime(jobs), abort)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; counted in requests_total
        except Exception as exc:
            raise _mapped(exc) from None
        if stream:
            return SSEResponse(_guard_stream(streamer(primed)), abort)
        try:
            body = await race_disconnect(request.receive, full(primed), abort)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            abort()
            raise _mapped(exc) from None
        finally:
            await primed.aclose()
        return JSONResponse(body)

    def _mapped(exc: Exception) -> Exception:
        mapped = engine_error(exc, settings.retry_after_s)
        return exc if mapped is None else mapped

    async def _guard_stream(events: Any) -> Any:
        """Once the stream has started, an engine failure can only be reported in-band."""
        try:
            async for e in events:
                yield e
        except Exception as exc:
            mapped = engine_error(exc, settings.retry_after_s)
            if mapped is None:
                log.exception("stream failed")
                mapped = ProtocolError("Internal server error", status=500, type="server_error")
            yield sse(error_body(mapped.message, mapped.type, mapped.param, mapped.code))
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    # -- routes -------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_api_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> dict[str, Any]:
        check_api_key(request)
        serving.check_model(model)
        return model_card()

    def model_card() -> dict[str, Any]:
        return {
            "id": serving.model_name,
            "object": "model",
            "created": started,
            "owned_by": "fusionserve",
            "max_model_len": serving.limits.max_model_len,
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_api_key(request)
        check_accepting()
        req = await read_json(request, CompletionRequest, settings.max_body_bytes)
        jobs = serving.completion_jobs(req)
        return await run_generation(
            request,
            jobs,
            bool(req.stream),
            lambda p: serving.completion_full(req, p),
            lambda p: serving.completion_stream(req, p),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_api_key(request)
        check_accepting()
        req = await read_json(request, ChatCompletionRequest, settings.max_body_bytes)
        job = serving.chat_job(req)
        return await run_generation(
            request,
            [job],
            bool(req.stream),
            lambda p: serving.chat_full(req, p),
            lambda p: serving.chat_stream(req, p),
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        check_api_key(request)
        req = await read_json(request, TokenizeRequest, settings.max_body_bytes)
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ProtocolError("give exactly one of 'prompt' or 'messages'", param="prompt")
        tok = serving.tokenizer
        if req.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                text = tok.apply_chat_template(
                    msgs, add_generation_prompt=req.add_generation_prompt is not False
                )
            except Exception as exc:
                raise ProtocolError(
                    f"messages cannot be rendered: {str(exc)[:300]}", param="messages"
                ) from None
            ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens is not False)
        return {"count": len(ids), "max_model_len": serving.limits.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        check_api_key(request)
        req = await read_json(request, DetokenizeRequest, settings.max_body_bytes)
        serving.check_model(req.model)
        check_token_ids(req.tokens, serving.limits, "tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/health")
    async def health() -> Response:
        alive = bool(engine.is_alive())
        if alive and not drain.draining:
            return JSONResponse({"status": "ok"})
        status = "draining" if alive else "engine_dead"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": settings.version}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        refresh_gauges()
        collect = getattr(engine, "collect_metrics", None)  # an engine in its own process
        body, content_type = metrics.render(await collect() if collect is not None else None)
        return Response(body, media_type=content_type)

    @app.get("/admin/fusion")
    async def get_fusion(request: Request) -> dict[str, Any]:
        check_admin(request)
        return await fusion_state()

    @app.post("/admin/fusion")
    async def set_fusion(request: Request) -> dict[str, Any]:
        check_admin(request)
        req = await read_json(request, FusionRequest, 4096)
        engine.fusion.set_mode(req.mode)
        metrics.set_fusion_mode(req.mode)
        log.info("fusion mode set to %s", req.mode)
        return await fusion_state()

    def refresh_gauges() -> None:
        """Queue and KV gauges read at scrape time: the engine sets them after each step, but an
        abort that leaves the engine idle has no step after it, and a stale 'running 1' would page
        someone. stats() only reads counters, so calling it from this thread is safe."""
        try:
            st = engine.stats()
            metrics.set_queue(st.running, st.waiting)
            metrics.set_kv_usage(st.kv_usage)
        except Exception:  # a scrape must never fail because of the engine
            log.debug("engine.stats() failed", exc_info=True)

    async def fusion_state() -> dict[str, Any]:
        mode = engine.fusion.mode
        summary = engine.fusion.summary()  # an engine in its own process answers over its pipe
        if inspect.isawaitable(summary):
            try:
                summary = await summary
            except Exception as exc:
                mapped = engine_error(exc, settings.retry_after_s)
                raise mapped or ProtocolError(
                    "The engine did not answer", status=503, type="service_unavailable_error"
                ) from None
        return {"mode": mode, "summary": summary}

    started = now()
    return app
