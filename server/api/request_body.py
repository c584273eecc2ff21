"""Reading a JSON body by hand: media type, size limit, strict UTF-8, no NaN/Infinity, then a
pydantic model.

By hand rather than FastAPI's body parameters so that every bad input maps to a 4xx with the
OpenAI error envelope and never reaches the engine.

The media type must be ``application/json``: a browser sends ``text/plain``, form or multipart
bodies cross-origin without a CORS preflight ("simple" requests), so accepting them would let any
web page the user visits drive a server on localhost. ``application/json`` forces the preflight,
which fails unless ``--allowed-origins`` names the page's origin (docs/DESIGN.md, "Browser safety").
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from fusionserve.server.api.errors import validation_error
from fusionserve.server.api.protocol import ProtocolError, check_strings

M = TypeVar("M", bound=BaseModel)


def check_json_media_type(content_type: str | None) -> None:
    """415 unless the Content-Type is application/json (parameters such as charset allowed)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = f"'{content_type}'" if content_type else "missing"
        raise ProtocolError(
            f"Content-Type must be application/json (got {shown})",
            status=415,
            code="unsupported_media_type",
        )


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not a valid JSON number (only finite numbers are allowed)")


async def _read_limited(request: Request, max_bytes: int) -> bytes:
    too_big = ProtocolError(
        f"Request body is larger than the limit of {max_bytes} bytes", status=413, code="request_too_large"
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
    return b"".join(chunks)


def _decode_object(raw: bytes) -> dict[str, Any]:
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
    return obj


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """Check the media type, then read, size-limit, decode and validate a JSON body into ``model``."""
    check_json_media_type(request.headers.get("content-type"))
    obj = _decode_object(await _read_limited(request, max_bytes))
    check_strings(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False)) from None
