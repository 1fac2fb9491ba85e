"""The real sidecar in-process: its aiohttp app, runner and engine link on an event-loop thread
of their own, listening on a free loopback port, as `edge-proxy` runs them."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from proxy.config import ProxyConfig
from proxy.http.app import SIDECAR, Sidecar, build_app, make_runner


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""
        self.app: web.Application | None = None
        self.sidecar: Sidecar | None = None

    async def _start(self) -> None:
        self.app = app = build_app(self.config)
        self.sidecar = app[SIDECAR]
        self.runner = make_runner(app, self.config)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = "http://127.0.0.1:%d" % self.runner.addresses[0][1]

    def __enter__(self) -> Proxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def call(self, coro):
        """Run a coroutine on the sidecar's loop (to look at its state safely)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def __exit__(self, *exc) -> None:
        if self.loop.is_closed():
            return  # stopped already (a test stopping a gateway mid-run)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
