"""A sidecar with its MQTT side (offload, device front, cloud worker, fleet agent) in-process, as
`edge-proxy` runs it, on a free loopback port; and small MQTT helpers for the tests that play
devices, workers or brokers going away."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.broker import SERVICES, attach
from proxy.broker_settings import MqttSettings
from proxy.config import ProxyConfig
from proxy.fleet import FleetConfig
from proxy.http.app import SIDECAR, build_app, make_runner
from proxy.mqtt import MqttConfig
from proxy.offload import CloudConfig, DevicesConfig, OffloadConfig

ROOT = Path(__file__).resolve().parent.parent
OFFLOAD_SECRET = secrets.token_hex(32)  # the test fleet's offload secret (gateways and workers share it)

FORCE_OFFLOAD = {"max_memory_percent": 0.001}  # every device is "over" this: the router offloads everything (reason memory)


def run(coro, timeout: float = 60):
    """A test's coroutine on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def mqtt_config(url: str, **kw: Any) -> MqttConfig:
    return MqttConfig(url=url, keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.3, **kw)


def settings(url: str, gateway_id: str = "gw-1", *, role: str = "gateway", offload: dict | None = None,
             devices: dict | None = None, cloud: dict | None = None, fleet: dict | None = None,
             mqtt: dict | None = None) -> MqttSettings:
    return MqttSettings(
        mqtt=mqtt_config(url, **(mqtt or {})),
        fleet=FleetConfig(gateway_id=gateway_id, telemetry_period_s=0, **{"allow_unsigned": True, **(fleet or {})}),
        offload=OffloadConfig(**{"accept_timeout_s": 3.0, "idle_timeout_s": 3.0, "secret": OFFLOAD_SECRET, **(offload or {})}),
        devices=DevicesConfig(**(devices or {})),
        cloud=CloudConfig(**(cloud or {})),
        role=role,
    )


class Gateway:
    """The real sidecar app with `attach(app, settings)`, served on a loop thread of its own."""

    def __init__(self, config: ProxyConfig, mqtt: MqttSettings) -> None:
        self.config = config
        self.mqtt = mqtt
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    async def _start(self) -> None:
        self.app = build_app(self.config)
        attach(self.app, self.mqtt)
        self.sidecar = self.app[SIDECAR]
        self.services = self.app[SERVICES]
        self.runner = make_runner(self.app, self.config)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = "http://127.0.0.1:%d" % self.runner.addresses[0][1]
        await self.services.client.wait_connected(10)
        await self.services.wait_subscribed(10)
        if self.mqtt.offload.max_memory_percent:  # offloading by memory needs the router's first reading of it
            async with asyncio.timeout(10):
                while self.sidecar.parts.router.health.memory_percent is None:
                    await asyncio.sleep(0.01)

    def __enter__(self) -> Gateway:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(20)
        return self

    def call(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn, *args):
        """Call a plain function on the gateway's loop (to touch its state safely)."""
        async def wrapped():
            return fn(*args)

        return self.call(wrapped())

    @property
    def router(self):
        return self.sidecar.parts.router

    def metric(self, name: str, **labels: str) -> float:
        return self.sidecar.metrics.registry.get_sample_value(name, labels or None) or 0.0

    def __exit__(self, *exc) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def worker_process(broker_url: str, engine_socket: Path, log_path: Path, *extra: str) -> subprocess.Popen:
    """`edge-proxy --role cloud` as its own process (so that a test can SIGKILL it)."""
    cmd = [sys.executable, "-m", "proxy.main", "--role", "cloud", "--mqtt", broker_url, "--engine-socket", str(engine_socket),
           "--port", "0", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_OFFLOAD_SECRET": OFFLOAD_SECRET}
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def post(url: str, body: dict, **kw) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, **kw) as r:
        return r.status, dict(r.headers), await r.read()


def sse_text(raw: bytes) -> tuple[str, list[dict]]:
    """The content of an SSE chat/completion stream, and its events (the error ones too)."""
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    text = ""
    for event in events:
        for choice in event.get("choices") or ():
            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text, events
