"""Telemetry sources: host health (psutil), NVIDIA GPUs (NVML, when `pynvml` imports), Jetson
(tegrastats), the engine's load (its status op) and the sidecar's own counters. A source that
fails leaves a note under `collect_errors`; it never stops the others."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from edge_runtime.client import EngineClient, EngineError

from .nvml import Nvml
from .tegrastats import Tegrastats

EngineStatusSource = Callable[[], Awaitable[dict[str, Any] | None]]
# The sidecar's figures, e.g. {"requests": .., "errors": .., "ttft_s": {"sum": .., "count": ..},
# "cache": {"hits": .., "misses": ..}, "offload": {"queue_full": .., "engine_down": ..}}.
CountersSource = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]
MAX_TEMPERATURES = 32
_ENGINE_DROP = ("type", "version", "heartbeat_age_s")


class EngineStatus:
    """The engine's `status` over its socket: one connection, opened again when lost."""

    def __init__(self, socket_path: str | Path, timeout_s: float = 2.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._client: EngineClient | None = None

    async def __call__(self) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._client is None or self._client.closed:
                    self._client = await EngineClient.connect(self.socket_path)
                return await self._client.status()
        except (OSError, EngineError):  # TimeoutError is an OSError
            await self.close()
            return None

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


class Collector:
    def __init__(
        self,
        *,
        disk_paths: tuple[str, ...] = ("/",),
        engine_status: EngineStatusSource | None = None,
        counters: CountersSource | None = None,
        nvml: Nvml | None = None,
        tegrastats: Tegrastats | None = None,
    ) -> None:
        self.disk_paths = disk_paths
        self.engine_status = engine_status
        self.counters = counters
        self.nvml = nvml
        self.tegrastats = tegrastats
        self._process = psutil.Process()
        psutil.cpu_percent(None)  # the first reading is meaningless: start the interval now
        self._process.cpu_percent(None)

    async def sample(self) -> dict[str, Any]:
        errors: dict[str, str] = {}
        sample: dict[str, Any] = {}
        try:
            sample.update(await asyncio.to_thread(self._host))
        except Exception as exc:
            errors["host"] = str(exc)[:200]
        if self.nvml is not None:
            try:
                sample["gpus"] = await asyncio.to_thread(self.nvml.sample)
            except Exception as exc:
                errors["nvml"] = str(exc)[:200]
        if self.tegrastats is not None and self.tegrastats.latest is not None:
            sample["jetson"] = self.tegrastats.latest
        if self.engine_status is not None:
            status = await self.engine_status()
            sample["engine"] = {"up": False} if status is None else {
                "up": True, **{k: v for k, v in status.items() if k not in _ENGINE_DROP}}
        if self.counters is not None:
            try:
                counters = self.counters()
                sample["proxy"] = dict(await counters if inspect.isawaitable(counters) else counters)
            except Exception as exc:
                errors["proxy"] = str(exc)[:200]
        if errors:
            sample["collect_errors"] = errors
        return sample

    def _host(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        host: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(None),
            "cpu_count": psutil.cpu_count(),
            "load": [round(x, 2) for x in os.getloadavg()],
            "mem_total": memory.total,
            "mem_available": memory.available,
            "mem_percent": memory.percent,
            "swap_percent": psutil.swap_memory().percent,
            "uptime_s": round(time.time() - psutil.boot_time()),
        }
        disks = {}
        for path in self.disk_paths:
            try:
                usage = psutil.disk_usage(path)
                disks[path] = {"total": usage.total, "used": usage.used, "percent": usage.percent}
            except OSError as exc:
                disks[path] = {"error": exc.strerror or str(exc)}
        host["disks"] = disks
        temps = _temperatures()
        if temps:
            host["temps_c"] = temps
        with self._process.oneshot():
            process = {"rss": self._process.memory_info().rss, "cpu_percent": self._process.cpu_percent(None),
                       "threads": self._process.num_threads()}
        return {"host": host, "process": process}


def _temperatures() -> dict[str, float]:
    read = getattr(psutil, "sensors_temperatures", None)  # Linux and FreeBSD only
    if read is None:
        return {}
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return {}
    temps: dict[str, float] = {}
    for chip, entries in sensors.items():
        for i, entry in enumerate(entries):
            if len(temps) < MAX_TEMPERATURES:
                temps[f"{chip}/{entry.label or i}"] = round(entry.current, 1)
    return temps
