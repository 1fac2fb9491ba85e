"""MqttClient against a real Mosquitto: publish/subscribe with v5 properties, reconnect with
re-subscription and the outbound queue, the 3.1.1 fallback, TLS, and username/password."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess

import pytest

from mqtt_harness import V311OnlyFront, make_tls_files
from edge_wire.settings import ConfigError
from proxy.mqtt import Message, MessageProperties, MqttClient, MqttConfig, OutMessage, QueueFull

TIMEOUT_S = 30.0  # generous: other test suites share this machine's CPUs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def config(url: str, **overrides) -> MqttConfig:
    return MqttConfig(url=url, keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.3, **overrides)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_publish_subscribe_with_properties_and_retained(mosquitto):
    async def main():
        pub, sub = MqttClient(config(mosquitto.url), "pub"), MqttClient(config(mosquitto.url), "sub")
        await pub.start()
        await sub.start()
        assert await pub.wait_connected(10) and await sub.wait_connected(10)
        assert pub.protocol == "5"
        await pub.publish("t/retained", b"kept", qos=1, retain=True)
        got: list[Message] = []
        also: list[Message] = []
        assert await sub.subscribe("t/#", got.append, qos=1) == 1
        await sub.subscribe("t/+", also.append, qos=0)  # a second handler on an overlapping filter
        props = MessageProperties(content_type="application/json", correlation_data=b"\x01req", response_topic="t/reply",
                                  user_properties=(("k", "v"),), message_expiry_s=60, payload_utf8=True)
        await pub.publish("t/live", '{"a": 1}', qos=1, properties=props)
        await until(lambda: any(m.topic == "t/live" for m in got) and any(m.topic == "t/live" for m in also))
        retained = next(m for m in got if m.topic == "t/retained")
        assert retained.retain and retained.payload == b"kept"
        live = next(m for m in got if m.topic == "t/live")
        assert not live.retain and live.payload == b'{"a": 1}'
        assert live.properties == props
        sub.unsubscribe("t/+", also.append)  # the other handler keeps its messages
        await pub.publish("t/after", b"x", qos=1)
        await until(lambda: any(m.topic == "t/after" for m in got))
        assert not any(m.topic == "t/after" for m in also)
        await pub.stop()
        await sub.stop()

    run(main())


def test_reconnect_resubscribes_and_delivers_the_queue(mqtt_broker):
    broker = mqtt_broker(persistence=True)

    async def main():
        a = MqttClient(config(broker.url, max_queued=3), "a")
        b = MqttClient(config(broker.url, session_expiry_s=60), "b")  # the broker keeps b's messages while it is away
        connects: list[int] = []
        b.on_connect(lambda: connects.append(b.connects))
        await a.start()
        await b.start()
        got: list[bytes] = []
        await b.subscribe("q/#", lambda m: got.append(m.payload), qos=1)
        assert await a.wait_connected(10)
        broker.stop()
        await until(lambda: not a.connected and not b.connected)
        pending = [a.publish("q/x", f"m{i}".encode(), qos=1) for i in range(3)]
        with pytest.raises(QueueFull):
            a.publish("q/x", b"one too many", qos=1)
        assert a.queued == 3
        broker.start()
        late: list[bytes] = []
        await b.wait_connected(10)
        await b.subscribe("late/#", lambda m: late.append(m.payload), qos=1)
        await asyncio.gather(*pending)  # delivered once the broker is back, in order
        await until(lambda: len(got) == 3)
        assert got == [b"m0", b"m1", b"m2"]
        assert connects == [1, 2]
        await a.publish("late/x", b"after", qos=1)
        await until(lambda: late == [b"after"])
        await a.stop()
        await b.stop()

    run(main())


def test_falls_back_to_3_1_1(mosquitto):
    async def main():
        front = V311OnlyFront(mosquitto.port)
        port = await front.start()
        client = MqttClient(config(f"mqtt://127.0.0.1:{port}"), "old-broker-client")
        queued = client.publish("legacy/t", b"sent before connecting", qos=1)
        got: list[Message] = []
        client.subscribe("legacy/#", got.append)
        await client.start()
        assert await client.wait_connected(10)
        assert client.protocol == "3.1.1" and front.refused_v5 == 1
        await queued
        # v5 properties are dropped on a 3.1.1 connection, the message still goes
        await client.publish("legacy/u", b"x", qos=1, properties=MessageProperties(content_type="text/plain"))
        await until(lambda: len(got) == 2)
        assert [m.payload for m in got] == [b"sent before connecting", b"x"]
        assert got[1].properties == MessageProperties()
        await client.stop()
        await front.stop()

    run(main())


def test_protocol_3_1_1_when_configured_and_last_will_on_a_lost_connection(mosquitto):
    async def main():
        watcher = MqttClient(config(mosquitto.url), "watcher")
        await watcher.start()
        statuses: list[bytes] = []
        await watcher.subscribe("gw/status", lambda m: statuses.append(m.payload))
        gone = MqttClient(config(mosquitto.url, protocol="3.1.1"), "gone", will=OutMessage("gw/status", b"lost", 1, True))
        await gone.start()
        assert await gone.wait_connected(10) and gone.protocol == "3.1.1"
        gone._paho.socket().shutdown(socket.SHUT_RDWR)  # the connection drops under it: no DISCONNECT
        await until(lambda: b"lost" in statuses)
        await gone.stop()
        clean = MqttClient(config(mosquitto.url), "clean", will=OutMessage("gw/status", b"lost-clean", 1, True))
        await clean.start()
        assert await clean.wait_connected(10)
        await clean.stop(final=[OutMessage("gw/status", b"bye", 1, True)])
        await until(lambda: b"bye" in statuses)
        await asyncio.sleep(0.3)
        assert b"lost-clean" not in statuses  # a clean disconnect drops the will
        await watcher.stop()

    run(main())


def test_an_oversize_publish_never_reaches_the_gateway(mosquitto):
    """An attacker publishes 10 MB on a gateway's topic: the broker, told the gateway's
    MaximumPacketSize at CONNECT, drops it instead of sending it; the gateway stays connected
    and reads the next message. A client that allows 16 MiB gets it (the attack is real)."""
    big, topic = b"x" * (10 << 20), "edge/gw-1/infer/request/dev-1"

    async def main():
        gateway = MqttClient(config(mosquitto.url), "gw-1")  # the default limit
        lenient = MqttClient(config(mosquitto.url, max_packet_bytes=16 << 20), "lenient")
        attacker = MqttClient(config(mosquitto.url), "attacker")
        for client in (gateway, lenient, attacker):
            await client.start()
            assert await client.wait_connected(10)
        seen: list[int] = []
        lenient_seen: list[int] = []
        await gateway.subscribe("edge/gw-1/#", lambda m: seen.append(len(m.payload)), qos=1)
        await lenient.subscribe("edge/gw-1/#", lambda m: lenient_seen.append(len(m.payload)), qos=1)
        await attacker.publish(topic, big, qos=1)
        await attacker.publish(topic, b"small", qos=1)
        await until(lambda: seen == [5] and lenient_seen == [len(big), 5])
        assert gateway.connected
        for client in (gateway, lenient, attacker):
            await client.stop()

    run(main())


def test_plaintext_to_a_broker_off_loopback_needs_an_explicit_opt_out():
    with pytest.raises(ConfigError, match=r"^url: mqtt://broker.example.net is not encrypted .* set allow_plaintext = true"):
        MqttConfig(url="mqtt://broker.example.net")
    assert MqttConfig(url="mqtt://broker.example.net", allow_plaintext=True).address.tls is False
    for url in ("mqtt://127.0.0.1", "mqtt://[::1]:1884", "mqtt://localhost", "mqtts://broker.example.net"):
        MqttConfig(url=url)


def test_tls(mqtt_broker, tmp_path):
    files = make_tls_files(tmp_path)
    broker = mqtt_broker(extra=(f"cafile {files['ca']}", f"certfile {files['cert']}", f"keyfile {files['key']}"))

    async def main():
        url = f"mqtts://127.0.0.1:{broker.port}"
        good = MqttClient(config(url, ca_file=str(files["ca"])), "tls-good")
        await good.start()
        assert await good.wait_connected(10)
        got: list[Message] = []
        await good.subscribe("s/#", got.append)
        await good.publish("s/x", b"over tls", qos=1)
        await until(lambda: len(got) == 1)
        untrusted = MqttClient(config(url), "tls-untrusted")  # the system CAs do not know the test CA
        await untrusted.start()
        assert not await untrusted.wait_connected(1.5)
        await untrusted.stop()
        await good.stop()

    run(main())


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_username_password_and_no_secret_in_logs(mqtt_broker, tmp_path, caplog):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "gw-1", "s3cret-pw"], check=True, capture_output=True)
    broker = mqtt_broker(extra=("allow_anonymous false", f"password_file {passwords}"))
    caplog.set_level(logging.DEBUG)

    async def main():
        right = MqttClient(config(broker.url, username="gw-1", password="s3cret-pw"), "auth-right")
        wrong = MqttClient(config(broker.url, username="gw-1", password="wr0ng-pw"), "auth-wrong")
        await right.start()
        await wrong.start()
        assert await right.wait_connected(10)
        await until(lambda: any("refused" in str(getattr(r, "error", "")) for r in caplog.records))
        assert not wrong.connected
        await right.stop()
        await wrong.stop()

    run(main())
    text = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    assert "s3cret-pw" not in text and "wr0ng-pw" not in text
