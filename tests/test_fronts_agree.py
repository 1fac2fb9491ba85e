"""The HTTP front and the MQTT device front are two doors to one completion service: the same
request gets the same answer (greedy), and the same bad value the same refusal, through either."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest
from engine_harness import Engine
from gateway_harness import Gateway, mqtt_config, post, settings

from proxy.config import ProxyConfig
from proxy.mqtt import MessageProperties, MqttClient

GATEWAY = "gw-agree"
REQUEST = f"edge/{GATEWAY}/infer/request/dev-1"
REPLY = f"edge/{GATEWAY}/infer/reply/dev-1"
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def gateway(broker, tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="agree-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as engine:
        config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",), cache_enabled=False)
        with Gateway(config, settings(broker.url, GATEWAY, devices={"enabled": True, "require_grant": False,
                                                                        "rate_limit_requests_per_min": 0})) as gw:
            yield gw


async def over_mqtt(broker_url: str, payload: dict) -> dict:
    """The device's last reply message (result or error)."""
    client = MqttClient(mqtt_config(broker_url), "dev-1")
    got: asyncio.Queue = asyncio.Queue()
    await client.start()
    try:
        await client.subscribe(REPLY, got.put_nowait, qos=1)
        client.publish(REQUEST, json.dumps(payload).encode(), qos=1, properties=MessageProperties(response_topic=REPLY))
        return json.loads((await asyncio.wait_for(got.get(), 30)).payload)
    finally:
        await client.stop()


async def over_http(url: str, body: dict) -> tuple[int, dict]:
    status, _, raw = await post(f"{url}/v1/chat/completions", {"model": "tiny", **body})
    return status, json.loads(raw)


def test_the_same_greedy_request_gets_the_same_answer(broker, gateway):
    request = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    status, body = asyncio.run(over_http(gateway.url, request))
    reply = asyncio.run(over_mqtt(broker.url, request))
    assert status == 200 and reply["type"] == "result"
    assert reply["text"] == body["choices"][0]["message"]["content"]
    assert reply["finish_reason"] == body["choices"][0]["finish_reason"]
    assert reply["usage"] == body["usage"]


@pytest.mark.parametrize("bad, code, param", [
    ({"repetition_penalty": 0.005}, "invalid_value", "repetition_penalty"),
    ({"max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"temperature": "hot"}, "invalid_value", "temperature"),
    ({"stop": ["x"] * 17}, "invalid_value", "stop"),
    ({"frobnicate": 1}, "unknown_parameter", "frobnicate"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "messages[0].role"),
])
def test_the_same_bad_value_gets_the_same_refusal(broker, gateway, bad, code, param):
    request = {"messages": MESSAGES, "max_tokens": 4, **bad}
    status, body = asyncio.run(over_http(gateway.url, request))
    reply = asyncio.run(over_mqtt(broker.url, request))
    assert status == 400 and (body["error"]["code"], body["error"]["param"]) == (code, param)
    assert reply["type"] == "error"
    assert (reply["error"]["status"], reply["error"]["code"], reply["error"]["param"]) == (400, code, param)
    assert reply["error"]["message"] == body["error"]["message"]
