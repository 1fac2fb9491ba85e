"""The settings of the sidecar's MQTT side (broker, fleet, offload, devices, cloud worker), read
from the config file and the command line. Apart from proxy/broker.py, which runs that side, so
that a sidecar without a broker loads none of it (paho, the fleet agent, the signing code)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_wire.settings import ConfigError

from .fleet.config import FleetConfig, fleet_config_from
from .mqtt.config import MqttConfig, mqtt_config_from
from .mqtt.topics import Topics
from .offload.config import (
    OFFLOAD_SECRET_ENV,
    CloudConfig,
    DevicesConfig,
    OffloadConfig,
    cloud_config_from,
    devices_config_from,
    offload_config_from,
)

GATEWAY, CLOUD = "gateway", "cloud"
ROLES = (GATEWAY, CLOUD)


@dataclass(frozen=True)
class MqttSettings:
    mqtt: MqttConfig | None  # None: no broker
    fleet: FleetConfig
    offload: OffloadConfig
    devices: DevicesConfig
    cloud: CloudConfig
    role: str = GATEWAY
    config_path: Path | None = None  # the file, for the fleet agent's view of what a push may change
    command_line: Mapping[str, str] = field(default_factory=dict)  # `table.key` -> the flag given that sets it

    @property
    def gateway_id(self) -> str:
        return self.fleet.resolved_gateway_id()

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet.topic_prefix)

    def offload_key(self) -> bytes | None:
        """The fleet's offload HMAC key (None: none). Without one a cloud worker refuses to start
        (ConfigError), and a gateway does not offload (proxy/offload/gateway.py), unless
        `allow_unauthenticated` says so: anyone on the broker could read, answer and cancel the
        requests."""
        key = self.offload.key()
        if key is None and self.role == CLOUD and not self.offload.allow_unauthenticated:
            raise ConfigError(f"[offload] secret: a cloud worker needs the fleet's offload secret: set secret_file or "
                              f"${OFFLOAD_SECRET_ENV}; allow_unauthenticated = true only in labs")
        return key


def load_settings(data: dict[str, Any], path: Path | None, *, mqtt_url: str | None = None, gateway_id: str | None = None,
                  role: str = GATEWAY, upstream: str | None = None, environ: dict[str, str] | None = None) -> MqttSettings:
    """The MQTT side's settings from a parsed config file and the command line's overrides."""
    if role not in ROLES:
        raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {role!r}")
    fleet = _flag("--gateway-id", fleet_config_from(data, path), gateway_id=gateway_id)
    mqtt = _flag("--mqtt", mqtt_config_from(data, path, environ), url=mqtt_url)
    table = data.get("mqtt")
    wanted = mqtt_url is not None or (isinstance(table, dict) and "url" in table) or fleet.enabled or role == CLOUD
    cloud = _flag("--upstream", cloud_config_from(data, path, environ), upstream=upstream)
    settings = MqttSettings(mqtt if wanted else None, fleet, offload_config_from(data, path, environ),
                            devices_config_from(data, path), cloud, role, path)
    if wanted:
        settings.offload_key()  # refused now, with the other config errors, rather than at the broker's start
    return settings


def _flag(flag: str, config: Any, **override: Any) -> Any:
    """`config` with a command-line flag's value laid over it (None: not given); a bad value is
    refused naming the flag."""
    try:
        return config.with_overrides(**override)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
