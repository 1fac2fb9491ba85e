"""Fleet sync's configuration: the `[fleet]` table of the shared TOML file."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

from msgspec import Meta

from edge_wire.settings import Check, ConfigError, Table, Text, load_table, read_config_file

from ..mqtt.topics import check_name, check_prefix

MIN_TELEMETRY_PERIOD_S = 0.1


def _unique(key: str, value: tuple[str, ...]) -> None:
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: lists a name twice")


def _absolute(key: str, value: str) -> None:
    if not value.startswith("/"):
        raise ConfigError(f"{key}: must be an absolute path, got {value!r}")


def _period(key: str, value: float) -> None:
    if 0 < value < MIN_TELEMETRY_PERIOD_S:
        raise ConfigError(f"{key}: must be 0 (off) or >= {MIN_TELEMETRY_PERIOD_S}, got {value}")


class FleetConfig(Table):
    enabled: Annotated[bool, Meta(description="the sidecar joins the fleet (presence, telemetry, config sync)")] = False
    gateway_id: Annotated[str | None, Meta(description="default: the host name", examples=["gw-0042"]), Check(check_name)] = None
    groups: Annotated[tuple[Annotated[str, Check(check_name)], ...], Check(_unique), Meta(
        description="desired configs for these groups apply too (later ones win, the gateway's own last)",
        examples=[["site-a", "cameras"]])] = ()
    topic_prefix: Annotated[str, Meta(description="the topic tree's first levels"), Check(check_prefix)] = "edge"
    telemetry_period_s: Annotated[float, Meta(ge=0, le=86400, description="0: no telemetry"), Check(_period)] = 10.0
    telemetry_buffer_bytes: Annotated[int, Meta(
        ge=4096, le=1 << 34, description="on-disk buffer while the broker is away; oldest dropped beyond")] = 4 << 20
    disk_paths: Annotated[tuple[Annotated[str, Check(_absolute)], ...], Meta(description="file systems whose use is reported")] = ("/",)
    state_dir: Annotated[Text | None, Meta(
        description="default: $STATE_DIRECTORY/fleet under systemd, else ~/.local/state/edge-runtime/fleet",
        examples=["/var/lib/edge-proxy/fleet"])] = None
    controller_public_key: Annotated[Text | None, Meta(
        description="Ed25519 PEM file (edgectl keygen): pushes must be signed with its private key; "
                    "fleet sync refuses to start without it unless allow_unsigned = true",
        examples=["/etc/edge-runtime/controller.pub"])] = None
    allow_unsigned: Annotated[bool, Meta(
        description="accept unsigned pushes (labs only: anyone who may publish to the broker can change the config); "
                    "keys that decide who may call the gateway or where it listens still need a signature")] = False
    max_clock_skew_s: Annotated[float, Meta(
        ge=1, le=7 * 86400,
        description="a pushed version (milliseconds since the epoch) may be at most this far ahead of the gateway's "
                    "clock, and a version reset must be issued within it")] = 300.0

    def check(self) -> None:
        if self.enabled:
            self.check_trust()
        self.resolved_gateway_id()

    def check_trust(self) -> None:
        """Fleet sync needs a controller key, or an explicit opt-out."""
        if not self.controller_public_key and not self.allow_unsigned:
            raise ConfigError("controller_public_key: required for fleet sync (edgectl keygen makes one); "
                              "or set allow_unsigned = true to accept unsigned pushes (labs only)")

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


def load_fleet_config(path: Path | None = None) -> FleetConfig:
    """The `[fleet]` table at `path` (without one: /etc/edge-runtime/config.toml if present, else defaults)."""
    data, path = read_config_file(path)
    return fleet_config_from(data, path)


def fleet_config_from(data: dict[str, Any], path: Path | None) -> FleetConfig:
    return load_table(FleetConfig, data, "fleet", path)
