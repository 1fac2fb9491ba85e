"""FleetAgent: a gateway's membership of the fleet, over one broker connection: presence,
telemetry, and desired/reported config sync (docs/DESIGN.md, "Fleet sync")."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from edge_wire.settings import ConfigError

from ..mqtt import Message, MqttClient, MqttConfig, OutMessage, Topics
from .buffer import TelemetryBuffer
from .config import FleetConfig
from .document import group_target
from .nvml import Nvml
from .presence import next_boot, status_payload
from .schema import ManagedTable, fleet_table
from .sender import TelemetrySender
from .signing import load_public_key
from .sync import APPLIED, NEEDS_RESTART, ApplyHook, ConfigSync, targets_of
from .tegrastats import Tegrastats
from .telemetry import Collector, CountersSource, EngineStatusSource

log = logging.getLogger("proxy.fleet")

TELEMETRY_DB = "telemetry.sqlite3"
_LIVE_FLEET_KEYS = frozenset({"fleet.telemetry_period_s"})


class FleetAgent:
    """Start with `await agent.start()` (returns at once; the broker connection comes up in the
    background and is retried forever) and end with `await agent.stop()` (publishes `offline`).

    - `fleet` and `tables` (the tables a controller may change besides `[fleet]`;
      schema.default_tables(path) loads them) hold the config file's values alone, without the
      pushed config laid over them (sync.applied_config): keys a push leaves out go back to
      these. The agent lays the pushed `[fleet]` keys over `fleet` itself.
    - `on_apply(changes)`: called with {"table.key": new value} for every key outside `[fleet]`
      that an accepted desired config changes; returns {"table.key": "applied" |
      "needs_restart" | a reason it failed}. Plain or async. A key it leaves out, or all of
      them without a hook, is reported as "needs_restart".
    - `counters()`: the sidecar's figures for telemetry (plain or async; see telemetry.py).
    - `engine_status()`: the engine's status frame, or None when it is down (telemetry.EngineStatus).

    `agent.client` is the agent's broker connection; other parts of the sidecar may subscribe
    and publish on it (it is started and stopped with the agent)."""

    def __init__(
        self,
        fleet: FleetConfig,
        mqtt: MqttConfig,
        *,
        tables: Mapping[str, ManagedTable] | None = None,
        on_apply: ApplyHook | None = None,
        counters: CountersSource | None = None,
        engine_status: EngineStatusSource | None = None,
        command_line: Mapping[str, str] | None = None,
    ) -> None:
        fleet.check_trust()  # no controller key: refused unless unsigned pushes are allowed explicitly
        self.fleet = fleet
        self.gateway_id = fleet.resolved_gateway_id()
        self.state_dir = fleet.resolved_state_dir()
        self.topics = Topics(fleet.topic_prefix)
        self.tables = {**(tables or {}), "fleet": fleet_table(fleet)}  # [fleet] as this agent runs it
        self.on_apply = on_apply
        self.public_key = load_public_key(Path(fleet.controller_public_key)) if fleet.controller_public_key else None
        self.client = MqttClient(mqtt, mqtt.client_id or self.gateway_id)
        self._counters = counters
        self._engine_status = engine_status
        self._command_line = command_line  # `table.key` -> a flag the process was given (sync.py)
        self.boot = 0
        self.sync: ConfigSync | None = None
        self.telemetry: TelemetrySender | None = None
        self._buffer: TelemetryBuffer | None = None
        self._nvml: Nvml | None = None
        self._tegrastats: Tegrastats | None = None

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.boot = next_boot(self.state_dir)
        self.sync = ConfigSync(
            gateway_id=self.gateway_id, targets=targets_of(self.fleet), state_dir=self.state_dir, tables=self.tables, public_key=self.public_key,
            allow_unsigned=self.fleet.allow_unsigned, max_clock_skew_s=self.fleet.max_clock_skew_s, apply_own=self._apply_fleet_keys,
            on_apply=self.on_apply, boot=self.boot, command_line=self._command_line,
        )
        if overridden := self.sync.overridden():
            log.warning("pushed keys not in force: a command-line flag sets them (the report says so)",
                        extra={"overridden": overridden})
        fleet = self._in_force()
        self._nvml = Nvml.open()
        if Tegrastats.available():
            self._tegrastats = Tegrastats(interval_ms=max(1000, int(fleet.telemetry_period_s * 500)))
            await self._tegrastats.start()
        self._buffer = TelemetryBuffer(self.state_dir / TELEMETRY_DB, fleet.telemetry_buffer_bytes)
        collector = Collector(disk_paths=fleet.disk_paths, engine_status=self._engine_status, counters=self._counters,
                              nvml=self._nvml, tegrastats=self._tegrastats)
        self.telemetry = TelemetrySender(self.client, self.topics.telemetry(self.gateway_id), self._buffer, collector,
                                         fleet.telemetry_period_s, self._envelope)
        self.client.will = self._status("offline", "connection lost")
        self.client.on_connect(self._on_connect)
        self.client.subscribe(self.topics.desired(self.gateway_id), self._on_desired(self.gateway_id), qos=1)
        for group in self.fleet.groups:
            self.client.subscribe(self.topics.group_desired(group), self._on_desired(group_target(group)), qos=1)
        if self.fleet.allow_unsigned:  # every start: an operator reading the log sees it
            log.warning("fleet sync accepts unsigned desired config (allow_unsigned = true): anyone who may publish to "
                        "the broker can change this gateway's config; set controller_public_key outside labs",
                        extra={"gateway": self.gateway_id, "controller_key": bool(self.public_key)})
        await self.client.start()
        self.telemetry.start()
        log.info("fleet agent started", extra={"gateway": self.gateway_id, "boot": self.boot, "groups": list(self.fleet.groups),
                                               "config_versions": self.sync.versions, "state_dir": str(self.state_dir)})

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline` (retained), deliver what is queued within `timeout`, disconnect."""
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.client.stop(final=[self._status("offline", "shutdown")], timeout=timeout)
        if self._tegrastats is not None:
            await self._tegrastats.stop()
        if self._nvml is not None:
            self._nvml.close()
        if self._buffer is not None:
            self._buffer.close()
        log.info("fleet agent stopped", extra={"gateway": self.gateway_id})

    def _in_force(self) -> FleetConfig:
        """`[fleet]` with the pushed keys laid over the file's (they were checked when pushed)."""
        assert self.sync is not None
        pushed = self.sync.config.get("fleet", {})
        try:
            return msgspec.structs.replace(self.fleet, **pushed)
        except (ConfigError, TypeError) as exc:  # the file changed since: the push no longer fits
            log.error("pushed [fleet] keys no longer valid; using the file's", extra={"error": str(exc)})
            return self.fleet

    @property
    def config_versions(self) -> dict[str, int]:
        """The applied desired config's version for each layer (group:NAME, gateway id)."""
        return self.sync.versions if self.sync else {}

    # -- internals --------------------------------------------------------------------------

    def _status(self, state: str, reason: str | None = None) -> OutMessage:
        payload = status_payload(state, self.gateway_id, self.boot, self.fleet.groups, reason, allow_unsigned=self.fleet.allow_unsigned)
        return OutMessage(self.topics.status(self.gateway_id), payload, qos=1, retain=True)

    def _envelope(self) -> dict[str, Any]:
        return {"v": 1, "gateway": self.gateway_id, "boot": self.boot,
                "fleet": {"config_versions": self.config_versions, "allow_unsigned": self.fleet.allow_unsigned}}

    async def _on_connect(self) -> None:
        online = self._status("online")
        self.client.publish(online.topic, online.payload, online.qos, online.retain)
        assert self.sync is not None
        if self.sync.report is not None:  # in case the broker lost its retained messages
            self._publish_report(self.sync.report)

    def _on_desired(self, target: str):
        async def handle(message: Message) -> None:
            assert self.sync is not None
            report = await self.sync.handle(target, message.payload)
            if report is not None:
                self._publish_report(report)

        return handle

    def _publish_report(self, report: dict[str, Any]) -> None:
        payload = json.dumps(report, separators=(",", ":"), ensure_ascii=False).encode()
        self.client.publish(self.topics.reported(self.gateway_id), payload, qos=1, retain=True)

    def _apply_fleet_keys(self, changes: dict[str, Any]) -> dict[str, str]:
        """The agent's own keys: the telemetry period changes live, the rest at the next start."""
        results = {}
        for key, value in changes.items():
            if key == "fleet.telemetry_period_s" and self.telemetry is not None:
                self.telemetry.period_s = value
            results[key] = APPLIED if key in _LIVE_FLEET_KEYS else NEEDS_RESTART
        return results
