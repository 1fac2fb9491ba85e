"""Jetson health from `tegrastats` (L4T has no NVML): the tool runs as a child process with
fixed arguments (no shell), and its latest line is parsed into numbers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from typing import Any

log = logging.getLogger("proxy.fleet.tegrastats")

TEGRASTATS = "/usr/bin/tegrastats"

_MEM = re.compile(r"\b(RAM|SWAP) (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_FREQ = re.compile(r"\b(GR3D_FREQ|EMC_FREQ) (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


def parse(line: str) -> dict[str, Any]:
    """One tegrastats line (TX2/Nano, Xavier or Orin format) as numbers:
    ram/swap MB, per-core CPU % (None for cores that are off), GPU and EMC %, temperatures in
    degrees C by sensor, and power rails in mW (current) by rail."""
    out: dict[str, Any] = {}
    for name, used, total in _MEM.findall(line):
        out[f"{name.lower()}_used_mb"] = int(used)
        out[f"{name.lower()}_total_mb"] = int(total)
    cpu = _CPU.search(line)
    if cpu:
        cores = [c.split("%")[0] for c in cpu.group(1).split(",")]
        out["cpu_percent"] = [int(c) if c.isdigit() else None for c in cores]
    for name, percent in _FREQ.findall(line):
        out["gpu_percent" if name == "GR3D_FREQ" else "emc_percent"] = int(percent)
    temps = {name: float(value) for name, value in _TEMP.findall(line)}
    if temps:
        out["temps_c"] = temps
    rails = {name: int(current) for name, current, _avg in _RAIL.findall(line) if name not in ("RAM", "SWAP")}
    if rails:
        out["power_mw"] = rails
    return out


class Tegrastats:
    """The tool in the background at `interval_ms`; `latest` is its last line, parsed."""

    def __init__(self, binary: str = TEGRASTATS, interval_ms: int = 1000) -> None:
        self.binary = binary
        self.interval_ms = interval_ms
        self.latest: dict[str, Any] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @staticmethod
    def available(binary: str = TEGRASTATS) -> bool:
        return os.access(binary, os.X_OK)

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self.binary, "--interval", str(int(self.interval_ms)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read(self._proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            self.latest = parse(raw.decode(errors="replace"))
        log.warning("tegrastats exited", extra={"returncode": await proc.wait()})

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
