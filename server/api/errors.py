"""Every failure as the OpenAI error envelope: protocol errors, pydantic validation, the engine's
errors (matched by class), Starlette's HTTP errors, and a catch-all that never shows a trace."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fusionserve.server.api.protocol import ProtocolError, error_body
from fusionserve.server.contract import EngineDeadError, QueueFullError, RequestTooLongError

log = logging.getLogger("fusionserve.http")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def protocol_error_response(exc: ProtocolError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic puts union-branch names (e.g. "str", "list[int]") in the loc: keep real field names.
    out: list[str] = []
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


def unavailable(message: str, code: str, headers: dict[str, str]) -> ProtocolError:
    """A 503 the client should retry (Retry-After in `headers`)."""
    return ProtocolError(message, status=503, type="service_unavailable_error", code=code, headers=headers)


def engine_error(exc: BaseException, retry_after_s: int) -> ProtocolError | None:
    """Map the engine's errors (docs/DESIGN.md, "Errors") to HTTP errors; None if not one of them."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, QueueFullError):
        return unavailable(
            "The server is overloaded: too many requests waiting. Retry later.", "queue_full", retry
        )
    if isinstance(exc, RequestTooLongError):
        return ProtocolError(str(exc)[:500], param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return unavailable(
            "The engine is not available (shutting down or failed).", "engine_unavailable", retry
        )
    if isinstance(exc, ValueError):
        return ProtocolError(str(exc)[:500], code="invalid_value")
    return None


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(ProtocolError)
    async def _protocol(_: Request, exc: ProtocolError) -> JSONResponse:
        return protocol_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return protocol_error_response(validation_error(list(exc.errors())))

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
        return protocol_error_response(ProtocolError(str(exc)[:500], code="invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        mapped = engine_error(exc, retry_after_s)
        if mapped is not None:
            return protocol_error_response(mapped)
        log.exception("internal error")
        return error_response(500, "Internal server error", "server_error")
