"""What operators and clients read about the server: models, health, version, metrics, and the
fusion switch (/admin/fusion)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fusionserve.server.api.protocol import FusionRequest
from fusionserve.server.api.request_body import read_json
from fusionserve.server.api.state import AppState, app_state

log = logging.getLogger("fusionserve.http")
router = APIRouter()


def _model_card(st: AppState) -> dict[str, Any]:
    return {
        "id": st.serving.model_name,
        "object": "model",
        "created": st.started,
        "owned_by": "fusionserve",
        "max_model_len": st.serving.limits.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    st = app_state(request)
    st.check_api_key(request)
    return {"object": "list", "data": [_model_card(st)]}


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> dict[str, Any]:
    st = app_state(request)
    st.check_api_key(request)
    st.serving.check_model(model)
    return _model_card(st)


@router.get("/health")
async def health(request: Request) -> Response:
    st = app_state(request)
    alive = bool(st.engine.is_alive())
    if alive and not st.drain.draining:
        return JSONResponse({"status": "ok"})
    if alive:
        status = "draining"
    else:
        status = "engine_restarting" if st.engine.restarting else "engine_dead"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/livez")
async def livez(request: Request) -> Response:
    """Liveness for orchestrators: 200 while this server can still serve, including while a dead
    engine is respawned (restarting the container then would only restart the reload); 503 once
    the engine is dead for good (the server is about to exit non-zero anyway)."""
    st = app_state(request)
    if st.engine.is_alive() or st.engine.restarting or st.drain.draining:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine_dead"}, status_code=503)


@router.get("/version")
async def version(request: Request) -> dict[str, str]:
    return {"version": app_state(request).settings.version}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    st = app_state(request)
    _refresh_gauges(st)
    body, content_type = st.metrics.render()
    return Response(body, media_type=content_type)


def _refresh_gauges(st: AppState) -> None:
    """Queue and KV gauges read at scrape time: an abort that leaves the engine idle has no step
    after it, and a stale 'running 1' would page someone."""
    try:
        st.metrics.set_engine_gauges(st.engine.stats())
    except Exception:  # a scrape must never fail because of the engine
        log.debug("engine.stats() failed", exc_info=True)


@router.get("/admin/fusion")
async def get_fusion(request: Request) -> dict[str, Any]:
    st = app_state(request)
    st.check_admin(request)
    return _fusion_state(st)


@router.post("/admin/fusion")
async def set_fusion(request: Request) -> dict[str, Any]:
    st = app_state(request)
    st.check_admin(request)
    req = await read_json(request, FusionRequest, 4096)
    st.fusion.set_mode(req.mode)
    st.metrics.set_fusion_mode(req.mode)
    log.info("fusion mode set to %s", req.mode)
    return _fusion_state(st)


def _fusion_state(st: AppState) -> dict[str, Any]:
    return {"mode": st.fusion.mode, "summary": st.fusion.summary()}
