"""What every route reads: one typed record on `app.state.fusionserve`, built by `create_app`."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from fusionserve import __version__
from fusionserve.server.api.fusion import FusionSwitch
from fusionserve.server.api.metrics import ServerMetrics
from fusionserve.server.api.openai_serving import Serving
from fusionserve.server.api.protocol import ProtocolError, now


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-layer settings (engine settings live in EngineConfig)."""

    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    version: str = __version__
    #: Browser origins allowed to call the API cross-origin (CORS with preflight); empty: no CORS
    #: headers at all, so browsers refuse cross-origin calls. "*" allows every origin.
    allowed_origins: tuple[str, ...] = ()
    #: The tool-call output format (server/api/tool_calls.py); None: detected from the chat template.
    tool_call_parser: str | None = None


class DrainState:
    """Set when a shutdown signal arrives: new work gets 503 while in-flight work finishes."""

    def __init__(self) -> None:
        self.draining = False


@dataclass
class AppState:
    engine: Any  # an EngineClient (or a test's stand-in with the same surface)
    settings: ServerSettings
    metrics: ServerMetrics
    serving: Serving
    fusion: FusionSwitch
    drain: DrainState = field(default_factory=DrainState)
    started: int = field(default_factory=now)

    def check_api_key(self, request: Request) -> None:
        if self.settings.api_key is not None and not _key_matches(_bearer(request), self.settings.api_key):
            raise ProtocolError(
                "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    def check_accepting(self) -> None:
        if self.drain.draining:
            raise ProtocolError(
                "The server is shutting down",
                status=503,
                type="service_unavailable_error",
                code="shutting_down",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    def check_admin(self, request: Request) -> None:
        if not self.settings.admin_key:
            raise ProtocolError(
                "The admin API is disabled: start the server with --admin-key",
                status=403,
                type="permission_error",
                code="admin_disabled",
            )
        if not _key_matches(_bearer(request), self.settings.admin_key):
            raise ProtocolError(
                "Invalid or missing admin key",
                status=401,
                type="authentication_error",
                code="invalid_admin_key",
            )


def app_state(request: Request) -> AppState:
    return request.app.state.fusionserve


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
