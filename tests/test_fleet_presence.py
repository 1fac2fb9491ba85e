"""Presence and telemetry of a real gateway process (`python -m proxy.fleet`): online with a boot
number, offline from the Last Will when it is SIGKILLed, offline ("shutdown") on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgpack

from proxy.mqtt import Message, MqttClient, MqttConfig

TIMEOUT_S = 60.0


def start_gateway(broker, tmp_path: Path) -> subprocess.Popen[bytes]:
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[mqtt]
url = "{broker.url}"
keepalive_s = 2
reconnect_min_s = 0.1
reconnect_max_s = 0.5
[fleet]
gateway_id = "gw-k"
allow_unsigned = true
groups = ["site"]
state_dir = "{tmp_path / 'state'}"
telemetry_period_s = 0.2
[proxy]
engine_socket = "{tmp_path / 'no-engine.sock'}"
""")
    log = open(tmp_path / "gateway.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "proxy.fleet", "--config", str(config)], stderr=log, cwd=os.getcwd())
    finally:
        log.close()


def test_fleet_sync_refuses_to_start_without_a_controller_key(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[fleet]\ngateway_id = "gw-k"\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run([sys.executable, "-m", "proxy.fleet", "--config", str(config)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "controller_public_key: required for fleet sync" in done.stderr and "allow_unsigned = true" in done.stderr
    assert not (tmp_path / "state").exists()  # refused before anything ran


def test_presence_will_and_telemetry_of_a_gateway_process(mosquitto, tmp_path):
    statuses: asyncio.Queue[dict] = asyncio.Queue()
    telemetry: list[dict] = []

    async def next_status(state: str) -> dict:
        while True:
            status = await asyncio.wait_for(statuses.get(), 30)
            if status["state"] == state:
                return status

    def on_status(message: Message) -> None:
        if message.payload:
            statuses.put_nowait(json.loads(message.payload))

    async def main():
        watcher = MqttClient(MqttConfig(url=mosquitto.url), "watcher")
        await watcher.start()
        await watcher.subscribe("edge/gw-k/status", on_status)
        await watcher.subscribe("edge/gw-k/telemetry", lambda m: telemetry.append(msgpack.unpackb(m.payload)))
        gateway = start_gateway(mosquitto, tmp_path)
        try:
            online = await next_status("online")
            assert (online["boot"], online["groups"], online["allow_unsigned"]) == (1, ["site"], True)  # the controller sees it
            while len(telemetry) < 2:
                await asyncio.sleep(0.05)
            gateway.send_signal(signal.SIGKILL)  # no goodbye: the broker speaks its Last Will
            gateway.wait(timeout=30)
            offline = await next_status("offline")
            assert (offline["boot"], offline["reason"]) == (1, "connection lost")

            gateway = start_gateway(mosquitto, tmp_path)
            assert (await next_status("online"))["boot"] == 2
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(timeout=30) == 0
            offline = await next_status("offline")
            assert (offline["boot"], offline["reason"]) == (2, "shutdown")
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait(timeout=30)
        await watcher.stop()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    first = telemetry[0]
    assert (first["gateway"], first["boot"], first["v"]) == ("gw-k", 1, 1)
    assert first["engine"] == {"up": False}  # no engine on that socket
    assert first["host"]["mem_total"] > 0 and "cpu_percent" in first["host"]
    assert first["fleet"]["dropped"] == 0 and first["fleet"]["allow_unsigned"] is True
    seqs = [t["seq"] for t in telemetry if t["boot"] == 1]
    assert seqs == sorted(seqs)
