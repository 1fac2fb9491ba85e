"""Fleet sync's configuration: the `[fleet]` table of the shared TOML file."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import ConfigError

from .. import tomlconf
from ..mqtt.topics import check_name, check_prefix

MIN_TELEMETRY_PERIOD_S = 0.1


@dataclass(frozen=True)
class FleetConfig:
    enabled: bool = False  # the sidecar runs the fleet agent (python -m proxy.fleet runs it regardless)
    gateway_id: str | None = None  # None: the host name
    groups: tuple[str, ...] = ()  # desired configs published to these groups apply here too
    topic_prefix: str = "edge"
    telemetry_period_s: float = 10.0  # 0: no telemetry
    telemetry_buffer_bytes: int = 4 << 20  # on-disk buffer for the broker's absence; oldest dropped beyond
    disk_paths: tuple[str, ...] = ("/",)  # file systems whose use telemetry reports
    state_dir: str | None = None  # None: $STATE_DIRECTORY (systemd), else ~/.local/state/edge-runtime/fleet
    controller_public_key: str | None = None  # PEM file of the controller's Ed25519 key (edgectl keygen)
    require_signature: bool | None = None  # None: required exactly when controller_public_key is set

    def __post_init__(self) -> None:
        tomlconf.validate(self, _RULES, _OPTIONAL)
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "disk_paths", tuple(self.disk_paths))
        if self.require_signature and not self.controller_public_key:
            raise ConfigError("require_signature: needs controller_public_key")
        self.resolved_gateway_id()

    def resolved_gateway_id(self) -> str:
        if self.gateway_id is not None:
            return self.gateway_id
        host = socket.gethostname().split(".")[0]
        try:
            return check_name("gateway_id", host)
        except ConfigError:
            raise ConfigError(f"gateway_id: the host name {host!r} cannot be a gateway id; set gateway_id") from None

    def resolved_state_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        systemd_dir = os.environ.get("STATE_DIRECTORY")
        if systemd_dir:
            return Path(systemd_dir.split(":")[0]) / "fleet"
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(xdg) / "edge-runtime" / "fleet"

    def signature_required(self) -> bool:
        return bool(self.controller_public_key) if self.require_signature is None else self.require_signature

    def with_overrides(self, **overrides: Any) -> FleetConfig:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def load_fleet_config(path: Path | None = None) -> FleetConfig:
    """The `[fleet]` table at `path` (without one: /etc/edge-runtime/config.toml if present, else defaults)."""
    data, path = tomlconf.read_file(path)
    return fleet_config_from(data, path)


def fleet_config_from(data: dict[str, Any], path: Path | None) -> FleetConfig:
    known = {f.name for f in dataclasses.fields(FleetConfig)}
    values = tomlconf.table(data, "fleet", path, known)
    try:
        return FleetConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{tomlconf.where(path, 'fleet')} {exc}") from None


def _names(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: must be a list of names, got {value!r}")
    for i, item in enumerate(value):
        check_name(f"{name}[{i}]", item)
    if len(set(value)) != len(value):
        raise ConfigError(f"{name}: lists a name twice")


def _paths(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p.startswith("/") for p in value):
        raise ConfigError(f"{name}: must be a list of absolute paths, got {value!r}")


def _period(name: str, value: Any) -> None:
    tomlconf.number(0, 86400)(name, value)
    if 0 < value < MIN_TELEMETRY_PERIOD_S:
        raise ConfigError(f"{name}: must be 0 (off) or >= {MIN_TELEMETRY_PERIOD_S}, got {value}")


_OPTIONAL = frozenset({"gateway_id", "state_dir", "controller_public_key", "require_signature"})
_RULES: dict[str, tomlconf.Rule] = {
    "enabled": tomlconf.boolean,
    "gateway_id": check_name,
    "groups": _names,
    "topic_prefix": check_prefix,
    "telemetry_period_s": _period,
    "telemetry_buffer_bytes": tomlconf.integer(4096, 1 << 34),
    "disk_paths": _paths,
    "state_dir": tomlconf.text,
    "controller_public_key": tomlconf.text,
    "require_signature": tomlconf.boolean,
}
