"""The telemetry loop: every period, a sample goes into the on-disk buffer; while the broker is
reachable, the buffer is sent oldest first (QoS 1, retained, so that a controller that looks
later still finds the latest) and each message leaves the buffer once the broker has it.
Every message takes the same path, so the order holds across outages and restarts."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack

from ..mqtt import MqttClient, MqttClosed, MqttError, QueueFull
from .buffer import TelemetryBuffer
from .telemetry import Collector

log = logging.getLogger("proxy.fleet.sender")

WINDOW = 32  # messages in flight at once while draining the buffer
_RETRY_S = 1.0


class TelemetrySender:
    def __init__(self, client: MqttClient, topic: str, buffer: TelemetryBuffer, collector: Collector,
                 period_s: float, envelope: Callable[[], dict[str, Any]]) -> None:
        self.client = client
        self.topic = topic
        self.buffer = buffer
        self.collector = collector
        self.envelope = envelope  # gateway, boot, config version: the fields every message carries
        self._period_s = period_s
        self._period_changed = asyncio.Event()
        self._queued = asyncio.Event()
        self._seq = itertools.count(1)
        self.last_seq = 0  # of the last sample taken (seq counts from 1 at every start)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def period_s(self) -> float:
        return self._period_s

    @period_s.setter
    def period_s(self, value: float) -> None:
        """Takes effect at once (the next sample is taken `value` seconds after the change)."""
        self._period_s = value
        self._period_changed.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._sample_loop(), name="telemetry-sample"),
                       asyncio.create_task(self._send_loop(), name="telemetry-send")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def sample_once(self) -> None:
        sample = await self.collector.sample()
        self.last_seq = next(self._seq)
        message = {**self.envelope(), "seq": self.last_seq, "ts": round(time.time(), 3), "period_s": self._period_s, **sample}
        message["fleet"] = {**message.get("fleet", {}), "buffered": len(self.buffer), "dropped": self.buffer.dropped,
                            "mqtt_connects": self.client.connects}
        self.buffer.append(msgpack.packb(message))
        self._queued.set()

    async def _sample_loop(self) -> None:
        while True:
            self._period_changed.clear()
            if self._period_s > 0:
                try:
                    await self.sample_once()
                except Exception:
                    log.exception("telemetry sample failed")
            try:  # sleep a period, or until the period changes (not wait_for: on 3.11 it can swallow stop()'s cancel)
                async with asyncio.timeout(self._period_s if self._period_s > 0 else None):
                    await self._period_changed.wait()
            except TimeoutError:
                pass

    async def _send_loop(self) -> None:
        while True:
            await self.client.wait_connected()
            self._queued.clear()
            rows = self.buffer.peek(WINDOW)
            if not rows:
                await self._queued.wait()
                continue
            futures, last_id = [], 0
            for row_id, payload in rows:
                try:
                    futures.append(self.client.publish(self.topic, payload, qos=1, retain=True))
                except QueueFull:  # other users of the connection filled the queue: send the rest later
                    break
                except MqttClosed:
                    return
                last_id = row_id
            if not futures:
                await asyncio.sleep(_RETRY_S)
                continue
            results = await asyncio.gather(*futures, return_exceptions=True)
            if any(isinstance(r, MqttClosed) for r in results):
                return
            refused = [r for r in results if isinstance(r, MqttError)]
            if refused:  # the broker will not take them (e.g. not authorized): keeping them would block the rest
                log.error("the broker refused telemetry; dropped", extra={"count": len(refused), "error": str(refused[0])})
            self.buffer.remove_through(last_id)
