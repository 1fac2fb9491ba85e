"""The sidecar's MQTT side in config.toml: `[offload]` (when and how a gateway offloads to the
cloud), `[devices]` (the IoT device front) and `[cloud]` (a cloud worker, `edge-proxy --role
cloud`). Each is checked on load with messages naming the key, like the other tables; a
controller may change `[offload]` and `[devices]` (most keys live, see proxy/services.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from msgspec import Meta

from edge_wire.settings import SECRET, Check, ConfigError, Table, Text, load_table

from ..mqtt.topics import check_name, check_prefix

UPSTREAM_KEY_ENV = "EDGE_CLOUD_UPSTREAM_API_KEY"


def _upstream(key: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{key}: must be an http:// or https:// base URL such as http://host:8000/v1, got {value!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{key}: must not carry credentials; set upstream_api_key or ${UPSTREAM_KEY_ENV}")


class OffloadConfig(Table):
    """with a broker ([mqtt] url or --mqtt): requests go to cloud workers when the gateway cannot serve them well"""

    enabled: Annotated[bool, Meta(description="offload when a broker is configured ([mqtt] url, --mqtt, or [fleet] enabled)")] = True
    max_wait_s: Annotated[float, Meta(
        ge=0, le=3600, description="offload when the engine's estimated queue wait is above this; 0: never for that reason")] = 5.0
    max_cpu_temp_c: Annotated[float, Meta(
        ge=0, le=200, description="offload while the hottest CPU sensor is above this (e.g. 85); 0: off")] = 0.0
    max_memory_percent: Annotated[float, Meta(ge=0, le=100, description="offload while memory use is above this (e.g. 92); 0: off")] = 0.0
    status_interval_s: Annotated[float, Meta(ge=0.05, le=3600, description="how often the engine's status and the sensors are read")] = 1.0
    accept_timeout_s: Annotated[float, Meta(
        gt=0, le=600, description="no cloud worker took the request by then: the cloud path failed")] = 5.0
    idle_timeout_s: Annotated[float, Meta(gt=0, le=3600, description="longest silence between two chunks of an offloaded answer")] = 10.0
    breaker_failures: Annotated[int, Meta(
        ge=1, le=1000, description="failures in a row that open a path's circuit breaker (local, cloud)")] = 3
    breaker_cooldown_s: Annotated[float, Meta(gt=0, le=3600, description="an open breaker lets a probe through after this")] = 10.0
    max_in_flight: Annotated[int, Meta(ge=1, le=100_000, description="offloads at once; past it the cloud path counts as full")] = 256
    retry_local: Annotated[bool, Meta(description="an offload failing before its first token is retried on the local engine")] = True


class DevicesConfig(Table):
    """the MQTT device front: {prefix}/{gateway}/infer/request (docs/mqtt-device-protocol.md)"""

    enabled: Annotated[bool, Meta(description="serve {prefix}/{gw}/infer/request when a broker is configured")] = True
    reply_prefix: Annotated[str | None, Meta(
        description="default {prefix}/{gateway}/infer/reply: replies go only under it", examples=["edge/gw-0042/infer/reply"]),
        Check(check_prefix)] = None
    max_payload_bytes: Annotated[int, Meta(ge=256, le=16 << 20, description="largest request payload")] = 65536
    max_concurrent: Annotated[int, Meta(ge=1, le=10_000, description="device requests served at once; more are answered 503")] = 16
    rate_limit_requests_per_min: Annotated[float, Meta(ge=0, description="per device (reply topic); 0: off")] = 60.0
    rate_limit_tokens_per_min: Annotated[float, Meta(ge=0, description="per device; 0: off")] = 0.0
    default_max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1, description="for device requests that name none")] = 128
    default_temperature: Annotated[float, Meta(ge=0, le=2, description="for device requests that name none")] = 1.0


class CloudConfig(Table):
    """edge-proxy --role cloud: a cloud worker"""

    share_group: Annotated[str, Meta(description="workers of one group share the load ($share/{group}/{prefix}/offload/request)"),
                           Check(check_name)] = "edge-cloud"
    upstream: Annotated[str | None, Meta(
        description="forward to an OpenAI-compatible server (\".../v1\") instead of the engine", examples=["http://127.0.0.1:8000/v1"]),
        Check(_upstream)] = None
    upstream_api_key: Annotated[Text | None, SECRET, Meta(description=f"better: ${UPSTREAM_KEY_ENV}", examples=["sk-..."])] = None
    upstream_model: Annotated[Text | None, Meta(description="default: the name the gateway sent", examples=["glm-4-9b-chat"])] = None
    max_concurrent: Annotated[int, Meta(
        ge=1, le=10_000, description="requests served at once; more are refused (busy) for the gateway to go elsewhere")] = 8


def offload_config_from(data: dict[str, Any], path: Path | None) -> OffloadConfig:
    return load_table(OffloadConfig, data, "offload", path)


def devices_config_from(data: dict[str, Any], path: Path | None) -> DevicesConfig:
    return load_table(DevicesConfig, data, "devices", path)


def cloud_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> CloudConfig:
    environ = os.environ if environ is None else environ
    loaded = {"upstream_api_key": environ[UPSTREAM_KEY_ENV]} if environ.get(UPSTREAM_KEY_ENV) else {}
    return load_table(CloudConfig, data, "cloud", path, **loaded)
