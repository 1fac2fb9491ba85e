"""The MQTT device client against a real Mosquitto broker (started on a free port by the
fixtures), with a small responder here that plays the gateway's part of
docs/mqtt-device-protocol.md: answers over MQTT v5 (ResponseTopic, CorrelationData) and 3.1.1
(reply_to), JSON and msgpack, streams delivered in order despite duplicates and reordering,
typed errors, timeouts, reconnection after a broker restart, and the trace context carried."""

from __future__ import annotations

import json
import threading
import time

import msgpack
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_client import APITimeoutError, BadRequestError, RateLimitError
from edge_client.mqtt_device import DeviceClient, decode
from proxy.mqtt import trace as trace_mqtt

GW = "gw1"


class Responder:
    """The gateway's side of the protocol, scripted: answers with the last message reversed."""

    def __init__(self, port: int) -> None:
        self.requests: list[dict] = []
        self.traces: list[dict | None] = []
        self.connected = threading.Event()  # set once its subscription is acknowledged
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="responder", protocol=paho.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.connected.set()
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe(f"edge/{GW}/infer/request/+", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        props = msg.properties
        content_type = getattr(props, "ContentType", None)
        request = decode(msg.payload, content_type)
        self.requests.append(request)
        self.traces.append(trace_mqtt.from_message(getattr(props, "UserProperty", None), request))
        reply_to = getattr(props, "ResponseTopic", None) or request["reply_to"]
        packed = msg.payload[:1] != b"{"

        def send(message: dict) -> None:
            out = Properties(PacketTypes.PUBLISH)
            out.ContentType = "application/msgpack" if packed else "application/json"
            if getattr(props, "CorrelationData", None):
                out.CorrelationData = props.CorrelationData
            data = msgpack.packb(message, use_bin_type=True) if packed else json.dumps(message).encode()
            client.publish(reply_to, data, qos=1, properties=out)

        rid = request["id"]
        text = (request.get("messages") or [{"content": request.get("prompt", "")}])[-1]["content"]
        if text == "slow":
            return  # never answers: the device's timeout
        if text == "limit":
            send({"id": rid, "seq": 0, "type": "error", "error": {
                "status": 429, "code": "rate_limit_exceeded", "message": "rate limited", "param": None, "retry_after_s": 2.0}})
            return
        answer = text[::-1]
        tail = {"finish_reason": "stop", "model": "tiny", "served_by": "local",
                "usage": {"prompt_tokens": 3, "completion_tokens": len(answer), "total_tokens": 3 + len(answer)}}
        if not request.get("stream"):
            send({"id": rid, "seq": 0, "type": "result", "text": answer, **tail})
            return
        pieces = [answer[i:i + 3] for i in range(0, len(answer), 3)]
        messages = [{"id": rid, "seq": i, "type": "chunk", "text": p} for i, p in enumerate(pieces)]
        messages.append({"id": rid, "seq": len(pieces), "type": "done", **tail})
        for i in [1, 0, 0, *range(2, len(messages)), 1]:  # as MQTT may deliver them: out of order, some twice
            send(messages[i])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(mqtt_broker):
    return mqtt_broker()


@pytest.fixture
def responder(broker):
    r = Responder(broker.port)
    yield r
    r.close()


@pytest.mark.parametrize("protocol, encoding", [("5", "json"), ("3.1.1", "json"), ("5", "msgpack"), ("3.1.1", "msgpack")])
def test_answers_over_v5_and_311(broker, responder, protocol, encoding):
    with DeviceClient(broker.url, gateway=GW, protocol=protocol, encoding=encoding, client_id=f"dev-{protocol}-{encoding}") as dev:
        answer = dev.chat([{"role": "user", "content": "hello device"}], max_tokens=8, timeout=10)
        assert answer.text == "ecived olleh" and answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 12
        assert answer.meta.served_by == "local" and answer.meta.gateway == GW and answer.model == "tiny"
        chunks = list(dev.chat_stream([{"role": "user", "content": "abcdefghijklmnop"}], timeout=10))
        assert "".join(c.text for c in chunks) == "ponmlkjihgfedcba"  # in order, duplicates dropped
        assert len(chunks) == 7 and chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens == 19
        assert dev.complete("abc", timeout=10).text == "cba"
    request = responder.requests[0]
    assert request["max_tokens"] == 8 and request["messages"][0]["content"] == "hello device"
    if protocol == "3.1.1":
        assert request["reply_to"] == f"edge/{GW}/infer/reply/dev-{protocol}-{encoding}"
    else:
        assert "reply_to" not in request  # v5 says it in ResponseTopic


def test_errors_and_timeouts(broker, responder):
    with DeviceClient(broker.url, gateway=GW) as dev:
        with pytest.raises(RateLimitError) as info:
            dev.complete("limit")
        assert info.value.retry_after == 2 and info.value.status == 429 and info.value.code == "rate_limit_exceeded"
        start = time.monotonic()
        with pytest.raises(APITimeoutError):
            dev.chat([{"role": "user", "content": "slow"}], timeout=0.5)
        assert time.monotonic() - start >= 0.5
        assert dev.chat([{"role": "user", "content": "after"}], timeout=10).text == "retfa"  # the client goes on


def test_reconnects_after_a_broker_restart(broker, responder):
    with DeviceClient(broker.url, gateway=GW, client_id="dev-restart") as dev:
        assert dev.chat([{"role": "user", "content": "one"}]).text == "eno"
        broker.stop()
        # Both sides must have seen the drop first, or the waits below pass on the old session.
        deadline = time.monotonic() + 20
        while responder.connected.is_set() or dev._subscribed.is_set():
            assert time.monotonic() < deadline, "the broker's stop went unnoticed"
            time.sleep(0.05)
        broker.start()
        assert responder.connected.wait(20) and dev._subscribed.wait(20)
        assert dev.chat([{"role": "user", "content": "two"}], timeout=20).text == "owt"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_trace_context_travels_with_the_request(broker, responder, protocol):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from edge_runtime import tracing

    tracing.install(InMemorySpanExporter())
    try:
        with DeviceClient(broker.url, gateway=GW, protocol=protocol) as dev:
            with tracing.tracer("device").start_as_current_span("sensor.ask") as span:
                dev.chat([{"role": "user", "content": "traced"}])
    finally:
        tracing.shutdown()
    trace = responder.traces[-1]
    assert trace["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert ("trace" in responder.requests[-1]) == (protocol == "3.1.1")  # 3.1.1: the payload field


def test_against_the_gateways_device_front(broker, tiny_model_dir):
    """The same client against the real sidecar's device front (over a tiny engine)."""
    import tempfile
    from pathlib import Path

    from engine_harness import Engine
    from gateway_harness import Gateway, settings

    from proxy.config import ProxyConfig

    with tempfile.TemporaryDirectory(prefix="dv-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as engine:
        config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",))
        with Gateway(config, settings(broker.url, "gw-sdk", devices={"enabled": True, "require_grant": False,
                                                                    "rate_limit_requests_per_min": 0})):
            for protocol, encoding in (("5", "json"), ("3.1.1", "msgpack")):
                with DeviceClient(broker.url, gateway="gw-sdk", protocol=protocol, encoding=encoding) as dev:
                    user = [{"role": "user", "content": "the quick brown fox"}]
                    whole = dev.chat(user, max_tokens=5, temperature=0, timeout=30)
                    assert whole.usage.completion_tokens >= 1 and whole.meta.served_by in ("local", "cache")
                    chunks = list(dev.chat_stream(user, max_tokens=5, temperature=0, timeout=30))
                    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].choices[0].finish_reason
                    with pytest.raises(BadRequestError) as info:
                        dev.chat(user, temperature=9, timeout=30)
                    assert info.value.param == "temperature"
