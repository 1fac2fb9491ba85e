"""A broker restart: the gateway reconnects, says `online` again, picks up the desired config it
missed while away, and delivers the telemetry it buffered during the outage, in order."""

from __future__ import annotations

import asyncio
import json

import msgpack
from mqtt_harness import free_port

from edgectl.cli import Controller
from proxy.fleet import FleetAgent, FleetConfig
from proxy.mqtt import Message, MqttClient, MqttConfig

TIMEOUT_S = 60.0


def mqtt(url: str, **overrides) -> MqttConfig:
    return MqttConfig(url=url, keepalive_s=2, reconnect_min_s=0.1, reconnect_max_s=0.5, **overrides)


async def until(predicate, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def test_broker_restart(mqtt_broker, tmp_path):
    broker = mqtt_broker(persistence=True)
    fleet = FleetConfig(gateway_id="gw-r", state_dir=str(tmp_path / "state"), telemetry_period_s=0.1, allow_unsigned=True)
    agent = FleetAgent(fleet, mqtt(broker.url))
    telemetry: list[dict] = []
    statuses: list[dict] = []

    def on_telemetry(message: Message) -> None:
        if not message.retain:  # live (or queued for us while we were away), not the retained copy
            telemetry.append(msgpack.unpackb(message.payload))

    def on_status(message: Message) -> None:
        statuses.append(json.loads(message.payload))

    async def main():
        # A controller-side watcher with a persistent session: the broker queues what it misses.
        watcher = MqttClient(mqtt(broker.url, session_expiry_s=300), "watcher")
        await watcher.start()
        await watcher.subscribe("edge/gw-r/telemetry", on_telemetry, qos=1)
        await watcher.subscribe("edge/gw-r/status", on_status, qos=1)
        await agent.start()
        await until(lambda: len(telemetry) >= 3 and any(s["state"] == "online" for s in statuses))
        async with Controller(mqtt(broker.url)) as ctl:
            assert (await ctl.push({"fleet": {"telemetry_period_s": 0.2}}, gateway="gw-r", version=1)).ok

        broker.stop()
        await until(lambda: not agent.client.connected)
        await until(lambda: len(agent.telemetry.buffer) >= 3)  # sampled while the broker is away, kept on disk
        # While the gateway is away, the controller pushes a new config (through the same broker,
        # brought up on a side port the gateway does not know, then stopped again).
        side_port = free_port()
        broker.start(port=side_port)
        async with Controller(mqtt(f"mqtt://127.0.0.1:{side_port}")) as ctl:
            result = await ctl.push({"fleet": {"telemetry_period_s": 0.1}}, gateway="gw-r", version=2, wait_s=0)
            assert result.reports == {}
        broker.stop()
        assert agent.config_versions == {"gw-r": 1}
        online_before = sum(s["state"] == "online" for s in statuses)

        broker.start()
        await until(lambda: agent.config_versions == {"gw-r": 2})  # the retained push it missed
        await until(lambda: sum(s["state"] == "online" for s in statuses) > online_before)  # presence again
        await until(lambda: len(agent.telemetry.buffer) == 0)  # all of it acknowledged by the broker ...
        sent = agent.telemetry.last_seq
        await until(lambda: telemetry[-1]["seq"] >= sent)  # ... and on to the watcher
        await agent.stop()
        await watcher.stop()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    seqs = [t["seq"] for t in telemetry]
    assert seqs == sorted(seqs), "telemetry out of order"
    assert set(range(seqs[0], seqs[-1] + 1)) <= set(seqs), "telemetry lost"
    assert any(t["fleet"]["buffered"] >= 2 for t in telemetry), "nothing was buffered during the outage"
    assert all(t["fleet"]["dropped"] == 0 for t in telemetry)
    assert statuses[-1]["state"] == "offline" and statuses[-1]["reason"] == "shutdown"
