"""Bounded HTTP connections for the sidecar (docs/reliability.md, "Bounded connections and warm
start"): aiohttp's request handler with a deadline for a request's head, a cap on connections
held at once (past it the longest idle one is closed, or the new one refused when none is
idle), and protocol-level bad requests (broken framing, oversize or malformed headers)
answered with a plain 400 that repeats nothing of the input and logged as one warning line,
without a traceback or the input (aiohttp's own answer quotes the offending bytes and its log
line is an error-level traceback). The keep-alive idle timeout is aiohttp's own; its timer,
which a connection's bytes do not reset, also bounds a head that never completes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol, web_server

from edge_runtime.logs import OncePer

log = logging.getLogger("proxy.http")

LIMIT_LOG_EVERY_S = 60.0  # connection-limit warnings: at most one line this often
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n" \
           b"Content-Length: 26\r\n\r\ntoo many open connections\n"
_numbers = itertools.count()
_BAD_REQUEST = "400 Bad Request\n\nthe request is not valid HTTP/1.1\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float  # from a request head's first byte to its end


class BoundedRequestHandler(web_protocol.RequestHandler):
    """One connection (aiohttp's handler, bounded as the module says)."""

    def __init__(self, manager: BoundedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.limits = manager.limits
        self.last_active = self._loop.time()  # connected, or last answer sent
        self.number = next(_numbers)  # in order of arrival (breaks ties of last_active)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, BoundedServer)
        refuse = manager.open_count() >= self.limits.max_connections and not manager.make_room()
        super().connection_made(transport)
        if refuse:
            manager.limit_log.warning("connection limit reached; refusing a new connection",
                                      extra={"max_connections": self.limits.max_connections})
            transport.write(_REFUSED)  # type: ignore[attr-defined]
            self.force_close()

    def idle(self) -> bool:
        """No request being handled (waiting for one, or for the rest of its head)."""
        return not self._request_in_progress and not self._messages

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is None and data and self.idle() and not self._force_close:
            self._head_timer = self._loop.call_later(self.limits.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.idle():  # the head is still incomplete
            log.debug("request head not completed in time; closing", extra={"header_timeout_s": self.limits.header_timeout_s})
            self.force_close()

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        self.last_active = self._loop.time()
        self._stop_head_timer()  # the next request's head starts its own clock
        super().log_access(request, response, time)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:
            return super().handle_error(request, status, exc, message)
        # The exception's text quotes the input: name only its kind.
        log.warning("bad HTTP request", extra={"remote": request.remote, "error": type(exc).__name__ if exc else None})
        response = web.Response(status=400, text=_BAD_REQUEST, content_type="text/plain")
        response.force_close()
        return response


class BoundedServer(web_server.Server):
    """aiohttp's connection manager, making BoundedRequestHandlers."""

    limits: ConnectionLimits
    limit_log: OncePer

    def __call__(self) -> BoundedRequestHandler:
        return BoundedRequestHandler(self, loop=self._loop, **self._kwargs)

    def open_count(self) -> int:
        """Connections held (one closed a moment ago stays listed until its task ends)."""
        return sum(1 for h in self.connections if h.transport is not None)

    def make_room(self) -> bool:
        """Close the connection idle the longest; False when every one is handling a request."""
        idle = [h for h in self.connections if isinstance(h, BoundedRequestHandler) and h.idle() and h.transport is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda h: (h.last_active, h.number))
        self.limit_log.warning("connection limit reached; closing the longest idle connection",
                               extra={"max_connections": oldest.limits.max_connections})
        oldest.force_close()
        return True


def bound(server: web_server.Server, limits: ConnectionLimits) -> web_server.Server:
    """`server` (what aiohttp's runner made) as a BoundedServer with these limits."""
    server.__class__ = BoundedServer  # the runner builds the Server itself; only its handler factory differs
    server.limits = limits  # type: ignore[attr-defined]
    server.limit_log = OncePer(log, LIMIT_LOG_EVERY_S)  # type: ignore[attr-defined]
    return server
