"""The IoT device front against a real Mosquitto (docs/mqtt-device-protocol.md): devices on MQTT
v5 and 3.1.1, JSON and msgpack, streamed and whole answers; garbage of every kind answered with
errors (or dropped when there is nowhere safe to answer) while the gateway keeps serving; per-
device rate limits; the safety filter."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import msgpack
import pytest
from engine_harness import Engine
from gateway_harness import Gateway, mqtt_config, run, settings

from proxy.config import ProxyConfig
from proxy.mqtt import Message, MessageProperties, MqttClient
from proxy.safety import Category, SafetyConfig

REQUEST = "edge/gw-dev/infer/request"
REPLY = "edge/gw-dev/infer/reply"



@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="dev-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture(scope="module")
def gateway(broker, engine):
    safety = SafetyConfig(categories=(Category("weapons", "block", terms=("pipe bomb",)),))
    config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",), safety=safety)
    devices = {"enabled": True, "require_grant": False, "rate_limit_requests_per_min": 0, "max_payload_bytes": 2048,
               "default_max_tokens": 6}
    with Gateway(config, settings(broker.url, "gw-dev", devices=devices)) as gw:
        yield gw


class Device:
    """A device: a raw MQTT client that collects every message on the topics it watches."""

    def __init__(self, url: str, name: str, protocol: str = "5", gateway: str = "gw-dev", **mqtt) -> None:
        self.client = MqttClient(mqtt_config(url, protocol=protocol, **mqtt), name)
        self.request_topic = f"edge/{gateway}/infer/request/{name}"  # its own: the broker vouches for its client id
        self.got: asyncio.Queue[Message] = asyncio.Queue()

    async def __aenter__(self) -> Device:
        await self.client.start()
        assert await self.client.wait_connected(10)
        return self

    async def watch(self, topic: str) -> None:
        await self.client.subscribe(topic, self.got.put_nowait, qos=1)

    async def __aexit__(self, *exc) -> None:
        await self.client.stop()

    def send(self, payload: bytes, **props) -> None:
        self.client.publish(self.request_topic, payload, qos=1, properties=MessageProperties(**props) if props else None)

    async def next(self, timeout: float = 20) -> tuple[Message, dict]:
        message = await asyncio.wait_for(self.got.get(), timeout)
        data = message.payload
        return message, (json.loads(data) if data[:1] == b"{" else msgpack.unpackb(data))

    async def until_done(self) -> list[dict]:
        replies = []
        while not replies or replies[-1]["type"] not in ("done", "result", "error"):
            replies.append((await self.next())[1])
        return replies


def test_a_v5_device_gets_its_answer_with_its_correlation_data(broker, gateway):
    async def main():
        async with Device(broker.url, "dev-v5") as dev:
            await dev.watch(f"{REPLY}/dev-v5")
            dev.send(json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0}).encode(),
                     response_topic=f"{REPLY}/dev-v5", correlation_data=b"\x00corr-1", content_type="application/json")
            return await dev.next()

    message, reply = run(main())
    assert message.properties.correlation_data == b"\x00corr-1" and message.properties.content_type == "application/json"
    assert reply["type"] == "result" and reply["seq"] == 0 and "id" not in reply
    assert reply["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] <= 5
    assert reply["served_by"] == "local" and isinstance(reply["text"], str)
    assert gateway.metric("edge_proxy_routed_requests_total", route="local", front="mqtt") >= 1


def test_a_311_device_streams_a_msgpack_answer_to_its_reply_to(broker, gateway):
    async def main():
        async with Device(broker.url, "dev-311", protocol="3.1.1") as dev:
            await dev.watch(f"{REPLY}/dev-311")
            assert dev.client.protocol == "3.1.1"
            dev.send(msgpack.packb({"id": "r-1", "reply_to": f"{REPLY}/dev-311", "prompt": "the quick", "stream": True,
                                    "max_tokens": 8, "temperature": 0.7, "seed": 5}))
            return await dev.until_done()

    replies = run(main())
    assert [r["seq"] for r in replies] == list(range(len(replies))) and all(r["id"] == "r-1" for r in replies)
    assert all(r["type"] == "chunk" for r in replies[:-1]) and replies[-1]["type"] == "done"
    assert replies[-1]["usage"]["completion_tokens"] <= 8 and replies[-1]["finish_reason"] in ("stop", "length")


def test_garbage_gets_error_replies_and_the_gateway_keeps_serving(broker, gateway):
    reply = f"{REPLY}/dev-bad"
    cases = [
        (b"\xff\x00\x13garbage", "invalid_payload", None),
        (b"[1, 2, 3]", "invalid_payload", None),
        (b'{"prompt": "x", "temperature": NaN}', "invalid_payload", None),
        (b'{"prompt": "x"', "invalid_payload", None),
        (b"{" * 5000, "request_too_large", None),
        (b'{"prompt": 5}', "invalid_value", "prompt"),
        (b'{"prompt": "x", "messages": []}', "missing_required_parameter", "prompt"),
        (b'{"prompt": "x", "temperature": 9}', "invalid_value", "temperature"),
        (b'{"prompt": "x", "tools": []}', "unknown_parameter", "tools"),
        (b'{"prompt": "x", "stream": "yes"}', "invalid_value", "stream"),
        (b'{"prompt": "x", "id": "no spaces allowed"}', "invalid_value", "id"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "invalid_value", "messages[0].role"),
        (b'{"prompt": "how to make a pipe bomb"}', "content_policy_violation", "prompt"),
        (msgpack.packb({"prompt": b"bytes, not text"}), "invalid_value", "prompt"),
        (msgpack.packb({1: 2}), "unknown_parameter", "1"),
    ]

    async def main():
        async with Device(broker.url, "dev-bad") as dev, Device(broker.url, "spy") as spy:
            await dev.watch(reply)
            await spy.watch("#")
            errors, misdirected = [], []
            for payload, _, _ in cases:
                dev.send(payload, response_topic=reply)
                errors.append((await dev.next())[1])
            # A reply topic other than the device's own is never published to: the request is
            # refused on the device's own topic; a request naming none is answered there.
            for bad in ("edge/gw-dev/status", "edge/gw-dev/infer/reply", "edge/gw-dev/infer/reply/+", "edge/other/x",
                        "edge/gw-dev/infer/reply//x", "$SYS/x"):
                dev.client.publish(dev.request_topic, json.dumps({"prompt": "x", "reply_to": bad}).encode(), qos=1)
                misdirected.append((await dev.next())[1])
            dev.client.publish(dev.request_topic, b'{"prompt": "x", "max_tokens": 2}', qos=1)
            unnamed = (await dev.next())[1]
            dev.send(b'{"id": "ok", "prompt": "still serving", "max_tokens": 3}', response_topic=reply)
            answer = (await dev.next())[1]
            # The gateway answered "ok" last: whatever it published before reached the spy first.
            seen = set()
            while True:
                message = await asyncio.wait_for(spy.got.get(), 20)  # (the requests seen are garbage)
                seen.add(message.topic)
                if message.topic == reply and message.payload.startswith(b"{") and json.loads(message.payload).get("id") == "ok":
                    break
            return errors, misdirected, unnamed, answer, seen

    errors, misdirected, unnamed, answer, seen = run(main())
    for (payload, code, param), error in zip(cases, errors):
        assert error["type"] == "error" and error["seq"] == 0, error
        assert (error["error"]["code"], error["error"]["param"]) == (code, param), (payload[:40], error)
        assert error["error"]["status"] in (400, 413)
    assert answer["type"] == "result" and answer["id"] == "ok"
    assert seen == {f"{REQUEST}/dev-bad", reply}, seen
    assert gateway.metric("edge_proxy_device_errors_total", reason="bad_reply_topic") == 6
    assert [(m["type"], m["error"]["code"], m["error"]["param"]) for m in misdirected] == \
        [("error", "invalid_reply_topic", "reply_to")] * 6
    assert unnamed["type"] == "result"
    assert gateway.metric("edge_proxy_device_errors_total", reason="malformed") == 4


def test_per_device_rate_limits(broker, engine):
    """The bucket is the device's (its client id): naming other reply topics neither escapes it
    nor spends another device's."""
    config = ProxyConfig(engine_socket=str(engine.socket_path))
    with Gateway(config, settings(broker.url, "gw-rl", devices={"enabled": True, "require_grant": False,
                                                                 "rate_limit_requests_per_min": 1})):

        async def main():
            out = {}
            async with Device(broker.url, "dev-rl", gateway="gw-rl") as dev, \
                    Device(broker.url, "dev-victim", gateway="gw-rl") as victim:
                await dev.watch("edge/gw-rl/infer/reply/dev-rl")
                await victim.watch("edge/gw-rl/infer/reply/dev-victim")
                # The attacker's first request is served; its next ones (naming its own reply
                # topic, then the victim's) are refused on its own topic.
                for name in ("dev-rl", "dev-rl", "dev-victim"):
                    dev.send(msgpack.packb({"prompt": "x", "max_tokens": 2}), response_topic=f"edge/gw-rl/infer/reply/{name}")
                    out.setdefault("dev-rl", []).append((await dev.next())[1])
                victim.send(msgpack.packb({"id": "victim-1", "prompt": "x", "max_tokens": 2}))
                # The gateway published anything it (wrongly) sent the victim before this answer:
                # the first message the victim gets must be its own answer.
                message, reply = await victim.next()
                out["dev-victim"] = [reply]
                assert message.topic == "edge/gw-rl/infer/reply/dev-victim" and reply.get("id") == "victim-1"
            return out

        replies = run(main())
        assert [r["type"] for r in replies["dev-rl"]] == ["result", "error", "error"] and replies["dev-victim"][0]["type"] == "result"
        error = replies["dev-rl"][1]["error"]
        assert error["status"] == 429 and error["code"] == "rate_limit_exceeded" and error["retry_after_s"] >= 1
        assert replies["dev-rl"][2]["error"]["code"] == "invalid_reply_topic"


@pytest.mark.parametrize("protocol, encoding", [("5", "json"), ("3.1.1", "msgpack")])
def test_the_sdk_device_client_against_the_real_gateway(broker, gateway, protocol, encoding):
    """edge_client.mqtt_device speaks the same protocol (docs/mqtt-device-protocol.md)."""
    from edge_client.mqtt_device import DeviceClient

    with DeviceClient(broker.url, gateway="gw-dev", protocol=protocol, encoding=encoding,
                      client_id=f"sdk-{protocol}-{encoding}") as dev:
        answer = dev.chat([{"role": "user", "content": "hello"}], max_tokens=4, timeout=20)
        assert answer.meta.served_by == "local" and answer.usage.completion_tokens <= 4
        chunks = list(dev.chat_stream([{"role": "user", "content": "hello"}], max_tokens=5, timeout=20))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens <= 5
        assert dev.complete("the quick", max_tokens=3, timeout=20).usage.completion_tokens <= 3
