"""Health flags of a gateway, from what the console holds about it: its presence, its last
report, its latest telemetry and its recent chart points. Thresholds come from [console]."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import ConsoleConfig
from .metrics import as_dict, is_number, max_temperature

FLAGS = ("offline", "rejecting", "hot", "memory", "offloading", "buffered")


def flags(status: dict[str, Any] | None, reported: dict[str, Any] | None, telemetry: dict[str, Any] | None,
          recent: Iterable[dict[str, Any]], config: ConsoleConfig) -> list[str]:
    out = []
    if not status or status.get("state") != "online":
        out.append("offline")
    if reported and reported.get("status") == "rejected":
        out.append("rejecting")
    telemetry = telemetry or {}
    temp = max_temperature(telemetry)
    if temp is not None and temp >= config.hot_c:
        out.append("hot")
    mem = as_dict(telemetry.get("host")).get("mem_percent")
    if is_number(mem) and mem >= config.memory_percent:
        out.append("memory")
    requests = offloaded = 0.0
    for p in recent:  # chart points: built by metrics.point, numbers only
        requests += p.get("requests", 0)
        offloaded += sum(p.get("offload", {}).values())
    if requests > 0 and offloaded / requests >= config.offload_fraction:
        out.append("offloading")
    fleet = as_dict(telemetry.get("fleet"))
    if any(is_number(fleet.get(k)) and fleet[k] > 0 for k in ("buffered", "dropped")):
        out.append("buffered")
    return out
