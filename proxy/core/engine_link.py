"""The sidecar's link to the engine daemon: one long-lived EngineClient connection, multiplexing
every request, re-established with backoff when it drops. A request that finds the engine down
triggers an immediate attempt and waits for it only briefly, so it is answered 503 at once.

A dead engine is noticed at once (its socket closes); a hung one by its status heartbeat: while
connected, the link asks for the engine's status every HEARTBEAT_S, and an engine that leaves
it unanswered for HUNG_AFTER_S is dropped like a dead one (its requests fail over, the link
reconnects). The last status answered is kept (`last_status`) for the times the engine is away.

Timeouts here are `asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11, wait_for swallows a
cancellation that arrives in the loop step in which the awaited thing finishes (a kick, a failed
connect), and `_run` then loops on forever: `close()`, and with it the sidecar's shutdown, hung."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.client import EngineClient, EngineError

from .errors import ApiError, unavailable

log = logging.getLogger("proxy.engine")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
CONNECT_TIMEOUT_S = 2.0  # connecting plus the first status and models answers
REQUEST_WAIT_S = 0.5  # how long a request waits for a connection attempt it triggered
RETRY_GAP_S = 0.1  # requests arriving this soon after a failed attempt do not trigger another
HEARTBEAT_S = 0.5  # how often a connected engine is asked for its status
HUNG_AFTER_S = 1.5  # an engine that answers no status for this long is taken for hung and dropped


class EngineLink:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.model: dict[str, Any] | None = None  # the engine's model, as its `models` answer said; kept while down
        self._client: EngineClient | None = None
        self._attempts = 0  # connection attempts finished, successful or not
        self._last_failure = float("-inf")  # loop time of the last failed attempt
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()  # pulsed (set, then replaced) whenever the state changes
        self._task: asyncio.Task[None] | None = None
        self.last_status: dict[str, Any] | None = None  # the engine's last status answer; kept while it is away
        self.on_connect: list[Callable[[], None]] = []  # called at every (re)connect: the engine announced itself

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.closed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def client(self) -> EngineClient:
        """The connected client; raises the 503 ApiError when the engine cannot be reached now."""
        client = self._client
        if client is not None and not client.closed:
            return client
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_failure < RETRY_GAP_S:
            raise unavailable("the engine is unreachable", 1.0)
        attempt = self._attempts
        self._kick.set()
        try:
            async with asyncio.timeout(REQUEST_WAIT_S):
                while True:
                    changed = self._changed
                    await changed.wait()
                    client = self._client
                    if client is not None and not client.closed:
                        return client
                    if self._attempts != attempt:
                        break
        except TimeoutError:
            pass
        raise unavailable("the engine is unreachable", 1.0)

    async def status(self, timeout_s: float = 1.0) -> dict[str, Any] | None:
        """The engine's status answer, or None when it is unreachable or does not answer in time."""
        try:
            client = await self.client()
            async with asyncio.timeout(timeout_s):
                status = await client.status()
        except (ApiError, EngineError, TimeoutError):
            return None
        self.last_status = status
        return status

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        reported_down = False
        loop = asyncio.get_running_loop()
        while True:
            self._kick.clear()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    client = await self._connect()
            except (OSError, EngineError, TimeoutError, KeyError, IndexError) as exc:
                self._attempts += 1
                self._last_failure = loop.time()
                self._pulse()
                if not reported_down:
                    log.warning("engine unreachable; retrying", extra={"socket": str(self.socket_path), "error": str(exc) or type(exc).__name__})
                    reported_down = True
                try:
                    async with asyncio.timeout(backoff):
                        await self._kick.wait()
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._client = client
            self._attempts += 1
            self._pulse()
            backoff, reported_down = BACKOFF_MIN_S, False
            log.info("engine connected", extra={"socket": str(self.socket_path), "model": (self.model or {}).get("id")})
            for hook in self.on_connect:
                hook()
            heartbeat = asyncio.create_task(self._heartbeat(client))
            try:
                await client.wait_closed()
            finally:
                heartbeat.cancel()
            self._client = None
            self._pulse()
            log.warning("engine connection lost; reconnecting", extra={"socket": str(self.socket_path)})
            await client.close()

    async def _heartbeat(self, client: EngineClient) -> None:
        """Drop the connection of an engine that stops answering its status (hung, or stopped)."""
        while not client.closed:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                async with asyncio.timeout(HUNG_AFTER_S):
                    self.last_status = await client.status()
            except TimeoutError:
                log.warning("engine answers no status; dropping the connection", extra={"after_s": HUNG_AFTER_S})
                await client.abort()
                return
            except EngineError:
                return  # the connection closed: the link notices

    async def _connect(self) -> EngineClient:
        client = await EngineClient.connect(self.socket_path)
        try:
            status = await client.status()
            models = await client.models()
        except BaseException:
            await client.close()
            raise
        client.max_frame_bytes = int(status.get("max_frame_bytes", client.max_frame_bytes))
        self.model = models[0]
        self.last_status = status
        return client
