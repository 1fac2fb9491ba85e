"""A scripted stand-in for a gateway, for the SDK's failure-handling tests: an HTTP server on a
loopback port (optionally a chosen one) whose /v1 answers follow a script (status, headers, or
"drop": read the whole request, then close the connection without a word), then succeed."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque

from aiohttp import web

CHAT_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class FakeGateway:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.script: deque = deque()  # (status, headers) or "drop" or ("stream", [events])
        self.hits: list[str] = []  # paths of every request received
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits.append(request.path)
        step = self.script.popleft() if self.script else None
        if step == "drop":
            request.transport.close()  # the request was read whole: it "may have started"
            raise asyncio.CancelledError
        if isinstance(step, tuple) and step[0] == "stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in step[1]:
                await response.write(b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n\n")
            await response.write_eof()
            return response
        if step is not None:
            status, headers = step
            body = {"error": {"message": f"scripted {status}", "type": "x", "param": None, "code": "scripted"}}
            return web.json_response(body, status=status, headers=headers)
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 1, "owned_by": "x"}]})
        return web.json_response(CHAT_ANSWER, headers={"x-served-by": "local", "x-request-id": request.headers.get("x-request-id", "")})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_route("*", "/v1/{tail:.*}", self._answer)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def __enter__(self) -> FakeGateway:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
