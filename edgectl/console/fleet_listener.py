"""The console's MQTT side: one controller connection (edgectl.cli.Controller) subscribed to
every gateway's presence, telemetry and report and to every desired document, keeping the
latest of each in memory (the overview) and the history in the store (the charts, the push
history). Pushes go out through the same Controller as `edgectl push` sends them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgectl.cli import Controller
from proxy.fleet.document import GROUP_PREFIX, DocumentError, decode_payload, parse_desired
from proxy.mqtt import Message, MqttConfig

from .metrics import is_number, point
from .store import HistoryStore

log = logging.getLogger("edgectl.console")

RECENT_POINTS = 10  # per gateway, for the health flags that look at a trend (offloading)
MAX_GATEWAYS = 10_000  # gateways the console follows; ids beyond are ignored (a broker flooded with made-up ids)
FLUSH_S, PRUNE_S = 1.0, 60.0


@dataclass
class GatewayState:
    id: str
    status: dict[str, Any] | None = None
    since: float | None = None  # when the current presence state began, as far as the console knows
    telemetry: dict[str, Any] | None = None
    telemetry_seen: float | None = None
    reported: dict[str, Any] | None = None
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_POINTS))
    points: int = 0  # chart points recorded since the console started


class FleetListener:
    def __init__(self, mqtt: MqttConfig, prefix: str, store: HistoryStore, key: Ed25519PrivateKey | None) -> None:
        self.controller = Controller(mqtt, prefix)
        self.topics = self.controller.topics
        self.store = store
        self.key = key
        self.gateways: dict[str, GatewayState] = {}
        self.desired: dict[str, dict[str, Any]] = {}  # target (gateway id or group:NAME) -> its retained document
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.controller.__aenter__()
        client, t = self.controller.client, self.topics
        for topic_filter, handler in ((t.status("+"), self._on_status), (t.telemetry("+"), self._on_telemetry),
                                      (t.reported("+"), self._on_reported), (t.desired("+"), self._on_desired),
                                      (t.group_desired("+"), self._on_desired)):
            await client.subscribe(topic_filter, handler, qos=1)
        self._tasks = [asyncio.create_task(self._housekeeping(), name="console-store")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.controller.__aexit__(None, None, None)
        self.store.flush()

    @property
    def connected(self) -> bool:
        return self.controller.client.connected

    async def push(self, config: dict[str, dict[str, Any]], *, gateway: str | None, group: str | None, issued_by: str) -> int:
        """Publish a signed desired document (retained) and return its version; the reports
        arrive on the listener's own subscription."""
        if self.key is None:
            raise PermissionError("the console has no signing key: read-only")
        result = await self.controller.push(config, gateway=gateway, group=group, key=self.key, wait_s=0, issued_by=issued_by)
        return result.version

    # -- handlers ----------------------------------------------------------------------------

    def _gateway(self, topic: str) -> GatewayState | None:
        gw = self.topics.gateway_of(topic)
        if gw is None:
            return None
        state = self.gateways.get(gw)
        if state is None and len(self.gateways) < MAX_GATEWAYS:
            state = self.gateways[gw] = GatewayState(gw)
        return state

    def _on_status(self, message: Message) -> None:
        status = _decode(message.payload)
        state = self._gateway(message.topic) if isinstance(status, dict) else None  # a gateway appears once it says something readable
        if state is None:
            return
        changed = state.status is None or state.status.get("state") != status.get("state") or state.status.get("boot") != status.get("boot")
        state.status = status
        if changed:  # retained: its own time (a Last Will carries the connect time); live: now
            ts = status.get("ts") if message.retain and isinstance(status.get("ts"), (int, float)) else time.time()
            state.since = ts

    def _on_telemetry(self, message: Message) -> None:
        telemetry = _decode(message.payload)
        readable = isinstance(telemetry, dict) and is_number(telemetry.get("ts"))
        state = self._gateway(message.topic) if readable else None
        if state is None:
            return
        previous = state.telemetry
        if previous is not None and (previous.get("boot"), previous.get("seq")) == (telemetry.get("boot"), telemetry.get("seq")):
            return  # the retained copy again (another subscription on the same filter)
        state.telemetry, state.telemetry_seen = telemetry, time.time()
        figures = point(telemetry, previous)
        state.recent.append(figures)
        state.points += 1
        self.store.add_point(state.id, telemetry["ts"], figures)
        if state.status is None:  # telemetry first (retained order): it is there, presence comes next
            state.since = telemetry["ts"]

    def _on_reported(self, message: Message) -> None:
        report = _decode(message.payload)
        state = self._gateway(message.topic) if isinstance(report, dict) else None
        if state is None:
            return
        state.reported = report
        self.store.record_report(state.id, report)

    def _on_desired(self, message: Message) -> None:
        target = self._target_of(message.topic)
        if target is None or not message.payload:
            return
        try:
            doc = parse_desired(message.payload, target)  # the gateway's own shape rules; bad ones are not history
        except DocumentError as exc:
            log.warning("undecodable desired document on the broker", extra={"target": target, "reasons": exc.reasons})
            return
        if target not in self.desired and len(self.desired) >= 2 * MAX_GATEWAYS:
            return  # a broker flooded with made-up targets
        self.desired[target] = doc
        self.store.record_push(doc)

    def _target_of(self, topic: str) -> str | None:
        group_head = f"{self.topics.prefix}/group/"
        if topic.startswith(group_head):
            return GROUP_PREFIX + topic[len(group_head):].split("/", 1)[0]
        return self.topics.gateway_of(topic)

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self.store.flush()
                if time.monotonic() - last_prune >= PRUNE_S:
                    last_prune = time.monotonic()
                    self.store.prune()
            except Exception:  # a full disk must not stop the console; the queue is bounded
                log.exception("history store write failed")


def _decode(payload: bytes) -> Any:
    """A fleet payload (JSON or msgpack), or None when empty or unreadable (ignored, not fatal)."""
    try:
        return decode_payload(payload) if payload else None
    except Exception:
        return None
