"""Client-disconnect detection for every phase of a request (docs/DESIGN.md, "Reliability").

Starlette tells a handler nothing when the client leaves: uvicorn's ``send()`` just
returns, and a non-streaming handler would keep the engine busy until the answer is
complete. So each generation handler races its work against ``receive()`` yielding
``http.disconnect`` and, when the client wins, cancels the work and aborts the
engine requests (freeing their KV blocks at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
log = logging.getLogger("fusionserve.http")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone (call only after the request body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def race_disconnect(receive: Receive, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T:
    """Await ``work``; if the client disconnects first, cancel it, call ``on_disconnect`` and
    raise :class:`ClientDisconnected`."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        on_disconnect()
        raise ClientDisconnected()
    finally:
        await _cancel(job, watcher)


class SSEResponse(Response):
    """A Server-Sent-Events response that notices the client leaving while it streams."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None]) -> None:
        self.events = events
        self.on_disconnect = on_disconnect
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                exc = pump.exception()
                if isinstance(exc, OSError):  # the transport broke under us: same as a disconnect
                    self.on_disconnect()
                elif exc is not None:
                    # Headers are out: the only honest signal left is to end the stream early.
                    log.error("stream failed after it started", exc_info=exc)
                    self.on_disconnect()
            else:
                self.on_disconnect()
        finally:
            await _cancel(pump, watcher)
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
