"""What the sidecar turns on, and why: one structured log line at start (`features`) that names,
for the fleet, offload, the device front, the cloud worker and tracing, whether it is on, what
decided it, and the key that changes it. It reads the same settings the parts are started from
(proxy/broker.py), so it says what the process does, not what a flag suggests: `--mqtt` alone
connects a broker but does not join the fleet, and the line says so."""

from __future__ import annotations

from typing import Any

from edge_runtime.tracing import TracingConfig

from .broker_settings import CLOUD, MqttSettings

Feature = dict[str, Any]  # {"on": bool, "why": str}

_NO_BROKER = "no broker: set [mqtt] url or --mqtt URL"


def _on(why: str) -> Feature:
    return {"on": True, "why": why}


def _off(why: str) -> Feature:
    return {"on": False, "why": why}


def summary(settings: MqttSettings, tracing: TracingConfig) -> dict[str, Any]:
    """The `features` log line's fields."""
    broker = settings.mqtt.url if settings.mqtt is not None else None
    out: dict[str, Any] = {"role": settings.role, "broker": broker}
    if settings.role == CLOUD:
        backend = f"forwards to {settings.cloud.upstream} ([cloud] upstream)" if settings.cloud.upstream else \
            "serves with the local engine (set [cloud] upstream or --upstream URL to forward)"
        out["cloud_worker"] = _on(f"--role cloud: {backend}")
        out["fleet"] = _off("a cloud worker does not join the fleet (role gateway does, with [fleet] enabled = true)")
        out["offload"] = _off("a cloud worker serves offloads; gateways send them")
        out["devices"] = _off("a cloud worker has no device front (role gateway does, with [devices] enabled = true)")
    else:
        out["fleet"] = _fleet(settings, broker)
        out["offload"] = _offload(settings, broker)
        out["devices"] = _devices(settings, broker)
    out["tracing"] = _tracing(tracing)
    return out


def _fleet(settings: MqttSettings, broker: str | None) -> Feature:
    if settings.fleet.enabled:
        return _on(f"[fleet] enabled = true: gateway {settings.gateway_id} on {broker}")
    if broker is not None:
        return _off("[fleet] enabled = false: a broker alone (--mqtt, [mqtt] url) does not join the fleet; "
                    "set [fleet] enabled = true")
    return _off("[fleet] enabled = false (set it to true, with [mqtt] url, to join the fleet)")


def _offload(settings: MqttSettings, broker: str | None) -> Feature:
    if broker is None:
        return _off(_NO_BROKER)
    if not settings.offload.enabled:
        return _off("[offload] enabled = false")
    if settings.offload.key() is not None:
        return _on(f"a broker ({broker}) and [offload] enabled = true, with the fleet's offload secret")
    if settings.offload.allow_unauthenticated:
        return _on(f"a broker ({broker}), with no secret ([offload] allow_unauthenticated = true: labs only)")
    return _off("no offload secret: set [offload] secret_file or $EDGE_OFFLOAD_SECRET (the same on gateways and workers)")


def _devices(settings: MqttSettings, broker: str | None) -> Feature:
    if not settings.devices.enabled:
        return _off("[devices] enabled = false")
    if broker is None:
        return _off(f"[devices] enabled = true, but {_NO_BROKER}")
    return _on(f"[devices] enabled = true, on {broker}")


def _tracing(config: TracingConfig) -> Feature:
    if not config.enabled:
        return _off("[tracing] enabled = false")
    return _on(f"[tracing] enabled = true: exporter {config.exporter} ({config.destination()})")
