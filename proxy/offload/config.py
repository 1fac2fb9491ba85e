"""The sidecar's MQTT side in config.toml: `[offload]` (when and how a gateway offloads to the
cloud), `[devices]` (the IoT device front) and `[cloud]` (a cloud worker, `edge-proxy --role
cloud`). Each is checked on load with messages naming the key, like the other tables; a
controller may change `[offload]` and `[devices]` (most keys live, see proxy/services.py)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_runtime.config import ConfigError

from .. import tomlconf
from ..mqtt.topics import check_name, check_prefix

UPSTREAM_KEY_ENV = "EDGE_CLOUD_UPSTREAM_API_KEY"


@dataclass(frozen=True)
class OffloadConfig:
    enabled: bool = True  # offload when a broker is configured ([mqtt] url, --mqtt, or [fleet] enabled)
    max_wait_s: float = 5.0  # offload when the engine's estimated queue wait is above this; 0: never for that reason
    max_cpu_temp_c: float = 0.0  # offload while the hottest CPU sensor is above this; 0: off
    max_memory_percent: float = 0.0  # offload while memory use (psutil) is above this; 0: off
    status_interval_s: float = 1.0  # how often the engine's status and the sensors are read
    accept_timeout_s: float = 5.0  # no worker took the request by then: the cloud path failed
    idle_timeout_s: float = 10.0  # longest silence between two chunks of an answer
    breaker_failures: int = 3  # failures in a row that open a path's circuit breaker
    breaker_cooldown_s: float = 10.0  # an open breaker lets a probe through after this
    max_in_flight: int = 256  # offloads at once; past it the cloud path counts as full
    retry_local: bool = True  # an offload that fails before its first token is retried on the local engine

    def __post_init__(self) -> None:
        tomlconf.validate(self, _OFFLOAD_RULES, frozenset())


@dataclass(frozen=True)
class DevicesConfig:
    enabled: bool = True  # serve {prefix}/{gw}/infer/request when a broker is configured
    reply_prefix: str | None = None  # None: {prefix}/{gw}/infer/reply; replies go only under it
    max_payload_bytes: int = 65536
    max_concurrent: int = 16  # device requests served at once; more are answered 503
    rate_limit_requests_per_min: float = 60.0  # per device (reply topic); 0: off
    rate_limit_tokens_per_min: float = 0.0
    default_max_tokens: int = 128  # for requests that name no max_tokens
    default_temperature: float = 1.0

    def __post_init__(self) -> None:
        tomlconf.validate(self, _DEVICES_RULES, frozenset({"reply_prefix"}))


@dataclass(frozen=True)
class CloudConfig:
    share_group: str = "edge-cloud"  # workers of one group share the load ($share/{group}/...)
    upstream: str | None = None  # an OpenAI-compatible base URL (".../v1") to forward to, instead of the engine
    upstream_api_key: str | None = dataclasses.field(default=None, repr=False)  # or $EDGE_CLOUD_UPSTREAM_API_KEY
    upstream_model: str | None = None  # the model to ask the upstream for (default: the gateway's name)
    max_concurrent: int = 8  # requests served at once; more are refused (busy) for the gateway to go elsewhere

    def __post_init__(self) -> None:
        tomlconf.validate(self, _CLOUD_RULES, frozenset({"upstream", "upstream_api_key", "upstream_model"}))

    def with_overrides(self, **overrides: Any) -> CloudConfig:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _load(cls: type, name: str, data: dict[str, Any], path: Path | None, extra: dict[str, Any] | None = None) -> Any:
    values = tomlconf.table(data, name, path, {f.name for f in dataclasses.fields(cls)})
    values.update(extra or {})
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{tomlconf.where(path, name)} {exc}") from None


def offload_config_from(data: dict[str, Any], path: Path | None) -> OffloadConfig:
    return _load(OffloadConfig, "offload", data, path)


def devices_config_from(data: dict[str, Any], path: Path | None) -> DevicesConfig:
    return _load(DevicesConfig, "devices", data, path)


def cloud_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> CloudConfig:
    environ = os.environ if environ is None else environ
    extra = {"upstream_api_key": environ[UPSTREAM_KEY_ENV]} if environ.get(UPSTREAM_KEY_ENV) else None
    return _load(CloudConfig, "cloud", data, path, extra)


def _reply_prefix(name: str, value: Any) -> None:
    check_prefix(name, value)


def _upstream(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: must be an http:// or https:// URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{name}: must be an http:// or https:// base URL such as http://host:8000/v1, got {value!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{name}: must not carry credentials; set upstream_api_key or ${UPSTREAM_KEY_ENV}")


_OFFLOAD_RULES: dict[str, tomlconf.Rule] = {
    "enabled": tomlconf.boolean,
    "max_wait_s": tomlconf.number(0, 3600),
    "max_cpu_temp_c": tomlconf.number(0, 200),
    "max_memory_percent": tomlconf.number(0, 100),
    "status_interval_s": tomlconf.number(0.05, 3600),
    "accept_timeout_s": tomlconf.number(0, 600, positive=True),
    "idle_timeout_s": tomlconf.number(0, 3600, positive=True),
    "breaker_failures": tomlconf.integer(1, 1000),
    "breaker_cooldown_s": tomlconf.number(0, 3600, positive=True),
    "max_in_flight": tomlconf.integer(1, 100_000),
    "retry_local": tomlconf.boolean,
}
_DEVICES_RULES: dict[str, tomlconf.Rule] = {
    "enabled": tomlconf.boolean,
    "reply_prefix": _reply_prefix,
    "max_payload_bytes": tomlconf.integer(256, 16 << 20),
    "max_concurrent": tomlconf.integer(1, 10_000),
    "rate_limit_requests_per_min": tomlconf.number(0),
    "rate_limit_tokens_per_min": tomlconf.number(0),
    "default_max_tokens": tomlconf.integer(1, 2**31 - 1),
    "default_temperature": tomlconf.number(0, 2),
}
_CLOUD_RULES: dict[str, tomlconf.Rule] = {
    "share_group": check_name,
    "upstream": _upstream,
    "upstream_api_key": tomlconf.text,
    "upstream_model": tomlconf.text,
    "max_concurrent": tomlconf.integer(1, 10_000),
}
