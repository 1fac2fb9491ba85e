"""Server-sent events: open the stream, write chunks, and end it — with `data: [DONE]` always,
after an error event when the stream fails midway, so a client never hangs on it."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from ..core.errors import ApiError

DONE = b"data: [DONE]\n\n"
_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END_TIMEOUT_S = 5.0  # a client too slow to take the last events is left behind


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=_HEADERS)
    await response.prepare(request)
    return response


def error_event(error: ApiError) -> bytes:
    """The OpenAI error body as a data event (the openai client raises it as an APIError)."""
    return b"data: " + json.dumps(error.payload()).encode() + b"\n\n"


async def end(response: web.StreamResponse, last: bytes) -> None:
    """Write the last events (ending with [DONE]) and close the stream; a client that has gone
    meanwhile is not an error."""
    try:
        async with asyncio.timeout(_END_TIMEOUT_S):
            await response.write(last)
            await response.write_eof()
    except (ConnectionError, TimeoutError):
        pass


async def fail(response: web.StreamResponse, error: ApiError) -> None:
    await end(response, error_event(error) + DONE)
