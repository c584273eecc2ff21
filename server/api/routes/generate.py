"""POST /v1/completions and /v1/chat/completions: prime the engine requests, then answer (JSON or
SSE), aborting them when the client goes away."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fusionserve.server.api.disconnect import ClientDisconnected, SSEResponse, race_disconnect
from fusionserve.server.api.errors import engine_error
from fusionserve.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    error_body,
)
from fusionserve.server.api.request_body import read_json
from fusionserve.server.api.serving_common import Job, Primed, sse
from fusionserve.server.api.state import AppState, app_state

log = logging.getLogger("fusionserve.http")
router = APIRouter()

#: HTTP status for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


async def _generate(request: Request, model: type[CompletionRequest | ChatCompletionRequest]) -> Response:
    st = app_state(request)
    st.check_api_key(request)
    st.check_accepting()
    req = await read_json(request, model, st.settings.max_body_bytes)
    sv = st.serving
    if isinstance(req, ChatCompletionRequest):
        jobs, full, stream = [sv.chat_job(req)], partial(sv.chat_full, req), partial(sv.chat_stream, req)
    else:
        jobs, full, stream = (
            sv.completion_jobs(req),
            partial(sv.completion_full, req),
            partial(sv.completion_stream, req),
        )
    await sv.check_constraints(jobs)
    return await _run(st, request, jobs, bool(req.stream), full, stream)


async def _run(
    st: AppState,
    request: Request,
    jobs: list[Job],
    stream: bool,
    full: Callable[[Primed], Awaitable[dict[str, Any]]],
    streamer: Callable[[Primed], AsyncIterator[str]],
) -> Response:
    """Primed first (a bad or refused request fails before the response starts), then answered."""
    ids = [j.request_id for j in jobs]

    def abort() -> None:
        st.serving.abort(ids)

    try:
        primed: Primed = await race_disconnect(request.receive, st.serving.prime(jobs), abort)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; counted in requests_total
    except Exception as exc:
        raise _mapped(st, exc) from None
    if stream:
        return SSEResponse(_guard_stream(st, streamer(primed)), abort)
    try:
        body = await race_disconnect(request.receive, full(primed), abort)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    except Exception as exc:
        abort()
        raise _mapped(st, exc) from None
    finally:
        await primed.aclose()
    return JSONResponse(body)


def _mapped(st: AppState, exc: Exception) -> Exception:
    mapped = engine_error(exc, st.settings.retry_after_s)
    return exc if mapped is None else mapped


async def _guard_stream(st: AppState, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the stream has started, an engine failure can only be reported in-band."""
    try:
        async for e in events:
            yield e
    except Exception as exc:
        mapped = engine_error(exc, st.settings.retry_after_s)
        if mapped is None:
            log.exception("stream failed")
            mapped = ProtocolError("Internal server error", status=500, type="server_error")
        yield sse(error_body(mapped.message, mapped.type, mapped.param, mapped.code))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
