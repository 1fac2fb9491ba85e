"""Telemetry messages -> chart points: the figures the gateway page plots, one flat dict per
message. Counters (requests, errors, cache, offloads, TTFT sums) become per-interval figures
by difference with the gateway's previous message of the same boot."""

from __future__ import annotations

import math
from typing import Any

# The series a point may carry (the page draws one chart for each; docs/console.md lists them).
SERIES = ("cpu", "mem", "temp", "gpu", "tps", "queue", "ttft_ms", "cache_hit", "requests", "errors", "offload")


def point(message: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The chart figures of one telemetry message (keys absent where the gateway gave nothing)."""
    host = as_dict(message.get("host"))
    engine = as_dict(message.get("engine"))
    proxy = as_dict(message.get("proxy"))
    out: dict[str, Any] = {}
    _put(out, "cpu", host.get("cpu_percent"))
    _put(out, "mem", host.get("mem_percent"))
    _put(out, "temp", max_temperature(message))
    gpus = [g.get("util_percent") for g in _gpus(message)]
    gpus = [g for g in gpus if is_number(g)]
    jetson = as_dict(message.get("jetson")).get("gpu_percent")
    _put(out, "gpu", max(gpus) if gpus else jetson)
    if engine.get("up"):
        _put(out, "tps", engine.get("tokens_per_s"))
        _put(out, "queue", engine.get("queue_depth"))
    before = as_dict(previous.get("proxy")) if previous and previous.get("boot") == message.get("boot") else None
    if before is None or not proxy:
        return out
    requests = _delta(proxy.get("requests"), before.get("requests"))
    _put(out, "requests", requests)
    _put(out, "errors", _delta(proxy.get("errors"), before.get("errors")))
    cache, cache_before = as_dict(proxy.get("cache")), as_dict(before.get("cache"))
    hits, misses = _delta(cache.get("hits"), cache_before.get("hits")), _delta(cache.get("misses"), cache_before.get("misses"))
    if hits is not None and misses is not None and hits + misses > 0:
        out["cache_hit"] = round(100 * hits / (hits + misses), 1)
    ttft, ttft_before = as_dict(proxy.get("ttft_s")), as_dict(before.get("ttft_s"))
    total, count = _delta(ttft.get("sum"), ttft_before.get("sum")), _delta(ttft.get("count"), ttft_before.get("count"))
    if total is not None and count:
        out["ttft_ms"] = round(1000 * total / count, 1)
    offload, offload_before = as_dict(proxy.get("offload")), as_dict(before.get("offload"))
    by_reason = {str(r): d for r in offload if (d := _delta(offload.get(r), offload_before.get(r, 0)))}
    if by_reason:
        out["offload"] = by_reason
    return out


def max_temperature(message: dict[str, Any]) -> float | None:
    """The hottest sensor: host sensors, GPUs (NVML), Jetson's."""
    temps = [t for t in as_dict(as_dict(message.get("host")).get("temps_c")).values() if is_number(t)]
    temps += [g["temp_c"] for g in _gpus(message) if is_number(g.get("temp_c"))]
    temps += [t for t in as_dict(as_dict(message.get("jetson")).get("temps_c")).values() if is_number(t)]
    return max(temps) if temps else None


def _gpus(message: dict[str, Any]) -> list[dict[str, Any]]:
    gpus = message.get("gpus")
    return [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []


def _delta(now: Any, before: Any) -> float | None:
    if not is_number(now) or not is_number(before):
        return None
    return now - before if now >= before else now  # a counter that went back: the process restarted


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if is_number(value):
        out[key] = round(value, 2) if isinstance(value, float) else value


def is_number(value: Any) -> bool:
    """A finite number (NaN would break the page's JSON)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a dict, else {}: gateways' payloads are read, never trusted to be well-formed."""
    return value if isinstance(value, dict) else {}
