"""The sidecar's MQTT side in config.toml: `[offload]` (when and how a gateway offloads to the
cloud), `[devices]` (the IoT device front) and `[cloud]` (a cloud worker, `edge-proxy --role
cloud`). Each is checked on load with messages naming the key, like the other tables; a
controller may change `[offload]` and `[devices]` (most keys live, see proxy/services.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from msgspec import Meta

from edge_wire.settings import SECRET, Check, ConfigError, Table, Text, load_table

from ..mqtt.topics import check_name, check_prefix

UPSTREAM_KEY_ENV = "EDGE_CLOUD_UPSTREAM_API_KEY"
OFFLOAD_SECRET_ENV = "EDGE_OFFLOAD_SECRET"
MIN_SECRET_BYTES = 32  # an HMAC-SHA256 key: as long as the hash, so that it cannot be guessed


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
    peer_timeout_s: Annotated[float, Meta(
        ge=0.15, le=600, description="a cloud worker that sends nothing, not even a heartbeat, for this long is taken for "
                                    "dead and its requests are moved (it is asked for a heartbeat 3 times as often)")] = 1.0
    breaker_failures: Annotated[int, Meta(
        ge=1, le=1000, description="failures in a row that open a path's circuit breaker (local, cloud)")] = 3
    breaker_cooldown_s: Annotated[float, Meta(gt=0, le=3600, description="an open breaker lets a probe through after this")] = 10.0
    max_in_flight: Annotated[int, Meta(ge=1, le=100_000, description="offloads at once; past it the cloud path counts as full")] = 256
    retry_local: Annotated[bool, Meta(description="an offload failing before its first token is retried on the local engine")] = True
    secret: Annotated[Text | None, SECRET, Meta(
        description=f"the fleet's offload secret (gateways and workers; HMAC-SHA256, {MIN_SECRET_BYTES}+ bytes): "
                    f"better secret_file or ${OFFLOAD_SECRET_ENV}", examples=["..."])] = None
    secret_file: Annotated[Text | None, Meta(
        description="file holding the offload secret (readable by this service only); read instead of secret when set",
        examples=["/etc/edge-runtime/offload.secret"])] = None
    allow_unauthenticated: Annotated[bool, Meta(
        description="labs only: offload (and, role cloud, serve) with no secret; anyone on the broker can read, answer "
                    "and cancel requests (without a secret and this, a gateway does not offload, a worker does not start)")] = False

    def key(self) -> bytes | None:
        """The HMAC key (None: none configured); ConfigError when the file cannot be read or the
        secret is too short."""
        if self.secret_file is not None:
            try:
                secret = Path(self.secret_file).read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"[offload] secret_file: cannot read {self.secret_file}: {exc.strerror}") from None
        elif self.secret is not None:
            secret = self.secret.encode("utf-8", "surrogatepass")
        else:
            return None
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"[offload] secret: must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`), "
                              f"got {len(secret)}")
        return secret


DEVICE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}").fullmatch  # a device: its MQTT client id, one topic level


class DeviceGrant(Table):
    """What one device may do (as a JWT's claims say for an HTTP caller)"""

    models: Annotated[tuple[Annotated[str, Meta(min_length=1)], ...] | None, Meta(description="model names it may use; none: all", examples=[["tiny"]])] = None
    max_tokens: Annotated[Annotated[int, Meta(ge=1, le=2**31 - 1)] | None, Meta(
        description="cap on max_tokens per request (also its default)", examples=[256])] = None
    tier: Annotated[Annotated[str, Meta(min_length=1)] | None, Meta(
        description="a [proxy.rate_limit_tiers] name; none: the [devices] limits", examples=["gold"])] = None


class DevicesConfig(Table):
    """the MQTT device front: {prefix}/{gateway}/infer/request/{device} (docs/mqtt-device-protocol.md)"""

    enabled: Annotated[bool, Meta(
        description="serve {prefix}/{gw}/infer/request/{device} (needs a broker; the broker must vouch for device ids)")] = False
    reply_prefix: Annotated[str | None, Meta(
        description="default {prefix}/{gateway}/infer/reply: a device's answers go to {reply_prefix}/{device}",
        examples=["edge/gw-0042/infer/reply"]), Check(check_prefix)] = None
    require_grant: Annotated[bool, Meta(
        description="a device needs an entry in grants or a credential in its request (API key or JWT, as on HTTP)")] = True
    grants: Annotated[dict[str, DeviceGrant], Meta(
        description="per device id (its MQTT client id): the models, max_tokens cap and rate-limit tier it may use")] = {}
    max_payload_bytes: Annotated[int, Meta(ge=256, le=16 << 20, description="largest request payload")] = 65536
    max_concurrent: Annotated[int, Meta(ge=1, le=10_000, description="device requests served at once; more are answered 503")] = 16
    max_concurrent_per_device: Annotated[int, Meta(
        ge=1, le=10_000, description="requests of one device served at once; more are answered 429")] = 2
    max_devices: Annotated[int, Meta(
        ge=1, le=10_000_000, description="devices whose rate-limit buckets are kept (least recently seen forgotten first)")] = 10_000
    rate_limit_requests_per_min: Annotated[float, Meta(ge=0, description="per device (its client id); 0: off")] = 60.0
    rate_limit_tokens_per_min: Annotated[float, Meta(ge=0, description="per device; 0: off")] = 0.0
    default_max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1, description="for device requests that name none")] = 128
    default_temperature: Annotated[float, Meta(ge=0, le=2, description="for device requests that name none")] = 1.0

    def check(self) -> None:
        for device in self.grants:
            if not DEVICE_ID(device):
                raise ConfigError(f"grants: device id {device[:80]!r} must be 1 to 128 of A-Z a-z 0-9 . _ : -")


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


def offload_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> OffloadConfig:
    environ = os.environ if environ is None else environ
    loaded = {"secret": environ[OFFLOAD_SECRET_ENV]} if environ.get(OFFLOAD_SECRET_ENV) else {}
    return load_table(OffloadConfig, data, "offload", path, **loaded)


def devices_config_from(data: dict[str, Any], path: Path | None) -> DevicesConfig:
    return load_table(DevicesConfig, data, "devices", path)


def cloud_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> CloudConfig:
    environ = os.environ if environ is None else environ
    loaded = {"upstream_api_key": environ[UPSTREAM_KEY_ENV]} if environ.get(UPSTREAM_KEY_ENV) else {}
    return load_table(CloudConfig, data, "cloud", path, **loaded)
