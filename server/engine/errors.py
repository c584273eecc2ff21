"""The errors the engine raises on purpose; the HTTP side maps them to status codes by class."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class QueueFullError(EngineError):
    """Too many waiting requests (HTTP 503 + Retry-After)."""


class RequestTooLongError(EngineError):
    """Prompt (+ max_tokens) over max_model_len (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop died or was shut down (HTTP 503)."""


class EngineShuttingDownError(EngineDeadError):
    """Draining: no new requests are admitted (HTTP 503)."""


class EngineStartError(EngineError):
    """The engine could not load the model or size its cache (bad configuration)."""
