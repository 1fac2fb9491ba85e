"""Offload from an attacker's side, against a real Mosquitto (issue 14): a rogue client subscribed
to the offload request topic cannot get its answer accepted nor cancel a gateway's request (bare,
with another secret, or sealed by another gateway of the fleet); a worker answers only to the
gateway a request names; ids are unguessable; and without a secret a gateway does not offload
and a worker does not start, unless a lab says `allow_unauthenticated`."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import tempfile
from pathlib import Path

import aiohttp
import pytest
from engine_harness import Engine
from gateway_harness import (
    FORCE_OFFLOAD,
    OFFLOAD_SECRET,
    Gateway,
    mqtt_config,
    post,
    run,
    settings,
    wait_for,
)

from edge_wire.settings import ConfigError
from proxy.broker_settings import load_settings
from proxy.config import ProxyConfig
from proxy.mqtt import Message, MessageProperties, MqttClient
from proxy.offload import protocol

KEY = OFFLOAD_SECRET.encode()
TOKENS = 24



@pytest.fixture(scope="module")
def sockets():
    with tempfile.TemporaryDirectory(prefix="offsec-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def worker(broker, tiny_model_dir, sockets):
    """A real cloud worker whose engine takes ~30 ms a token: cancels have time to land."""
    with Engine(tiny_model_dir, sockets / "cloud.sock", delay_s=0.03) as engine, \
            Gateway(ProxyConfig(engine_socket=str(engine.socket_path)), settings(broker.url, role="cloud")) as w:
        yield w


@pytest.fixture(scope="module")
def gateway(broker, worker, tiny_model_dir, sockets):
    with Engine(tiny_model_dir, sockets / "local.sock") as local, \
            Gateway(ProxyConfig(engine_socket=str(local.socket_path), model_aliases=("tiny",)),
                    settings(broker.url, "gw-victim", offload={**FORCE_OFFLOAD, "retry_local": False})) as gw:
        yield gw


class Rogue:
    """A client on the broker without the fleet's secret (or with `key`, as another gateway of the
    fleet): it reads every offload request and answers or cancels it at once."""

    def __init__(self, url: str, act) -> None:
        self.client = MqttClient(mqtt_config(url), "rogue-" + secrets.token_hex(3))
        self.act = act
        self.seen: list[dict] = []

    async def __aenter__(self) -> Rogue:
        await self.client.start()
        assert await self.client.wait_connected(10)
        await self.client.subscribe("edge/offload/request", self._on_request, qos=1)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.stop()

    def _on_request(self, message: Message) -> None:
        envelope = protocol.decode(message.payload)  # integrity, not secrecy: the broker ACL keeps others from reading
        request = protocol.decode(envelope["msg"])
        self.seen.append(request)
        self.act(self.client, request)


def chat(stream: bool) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": TOKENS,
            "ignore_eos": True, "stream": stream}


def forge_answer(client: MqttClient, request: dict) -> None:
    """Chunk 0 and a whole answer, bare and sealed with a wrong secret, before any worker can."""
    reply_to = request["reply_to"]
    frames = [{"type": "accepted"}, {"type": "token", "text": "PWNED"},
              {"type": "done", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}]
    for key in (None, b"guessed-" * 4):
        for seq, frame in enumerate(frames):
            chunk = protocol.encode_chunk(request["id"], seq, frame, "rogue")
            client.publish(reply_to, protocol.seal(key, reply_to, chunk), qos=1,
                           properties=MessageProperties(correlation_data=request["id"].encode()))


def test_a_rogue_subscriber_cannot_get_its_answer_accepted(broker, gateway, worker):
    async def main():
        async with Rogue(broker.url, forge_answer) as rogue:
            status, headers, raw = await post(f"{gateway.url}/v1/chat/completions", chat(stream=False))
            return rogue.seen, status, headers, json.loads(raw)

    seen, status, headers, body = run(main())
    assert seen, "the rogue saw no request"
    assert (status, headers["x-served-by"]) == (200, "cloud")
    assert "PWNED" not in body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == TOKENS
    assert gateway.metric("edge_proxy_offload_chunks_dropped_total", reason="unauthenticated") >= 6
    # The id it saw: the gateway, 128 random bits, the local id.
    assert re.fullmatch(r"gw-victim\.[0-9a-f]{32}\..+", seen[0]["id"])


async def ask_while_watching_replies(client: MqttClient, on_chunk, gateway: Gateway) -> tuple[int, dict, bytes]:
    """One offloaded request of the victim gateway, with `client` watching its reply topic."""
    await client.start()
    assert await client.wait_connected(10)
    await client.subscribe("edge/gw-victim/offload/reply", on_chunk, qos=1)
    try:
        return await post(f"{gateway.url}/v1/chat/completions", chat(stream=False))
    finally:
        await client.stop()


def test_chunks_from_anyone_but_the_claiming_worker_are_dropped_and_counted(broker, gateway, worker):
    """Even sealed with the fleet's secret (a second worker, a leaked key): once the real worker's
    chunk 0 claimed the request, chunks naming another worker, or none, never reach the answer."""
    intruder = MqttClient(mqtt_config(broker.url), "intruder")
    injected: list[int] = []

    def on_chunk(message: Message) -> None:
        chunk = protocol.decode(protocol.decode(message.payload)["msg"])
        if chunk["seq"] != 1 or injected:
            return
        for seq in range(2, 6):
            frame = {"type": "token", "text": "INJECTED", "token_id": -1}
            forged = protocol.encode_chunk(chunk["id"], seq, frame, "impostor" if seq % 2 else None)
            intruder.publish(message.topic, protocol.seal(KEY, message.topic, forged), qos=1)
            injected.append(seq)

    before = gateway.metric("edge_proxy_offload_chunks_dropped_total", reason="other_worker")

    status, headers, raw = run(ask_while_watching_replies(intruder, on_chunk, gateway))
    body = json.loads(raw)
    assert injected and (status, headers["x-served-by"]) == (200, "cloud")
    assert "INJECTED" not in body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == TOKENS
    assert gateway.metric("edge_proxy_offload_chunks_dropped_total", reason="other_worker") == before + 4


def test_a_rogue_cannot_cancel_another_gateways_request(broker, gateway, worker):
    """Once the worker streams the answer, cancels on the old shared topic, bare, with a wrong
    secret, and sealed by another gateway of the fleet (on its own cancel topic, or with the
    victim's name, or sealed for another topic and put on the victim's)."""
    rogue = MqttClient(mqtt_config(broker.url), "rogue-cancel")
    sent: list[str] = []

    def on_chunk(message: Message) -> None:
        chunk = protocol.decode(protocol.decode(message.payload)["msg"])
        if chunk["seq"] < 1 or sent:
            return
        rid, victim, other = chunk["id"], "edge/gw-victim/offload/cancel", "edge/gw-other/offload/cancel"
        for topic, payload in (
            ("edge/offload/cancel", protocol.encode_cancel(rid, "gw-victim")),
            (victim, protocol.encode_cancel(rid, "gw-victim")),
            (victim, protocol.seal(b"guessed-" * 4, victim, protocol.encode_cancel(rid, "gw-victim"))),
            (other, protocol.seal(KEY, other, protocol.encode_cancel(rid, "gw-victim"))),
            (other, protocol.seal(KEY, other, protocol.encode_cancel(rid, "gw-other"))),
            (victim, protocol.seal(KEY, other, protocol.encode_cancel(rid, "gw-victim"))),
        ):
            rogue.publish(topic, payload, qos=1)
        sent.append(rid)

    before = worker.metric("edge_proxy_cloud_requests_total", outcome="cancelled")

    status, headers, raw = run(ask_while_watching_replies(rogue, on_chunk, gateway))
    assert sent, "the rogue never saw the answer start"
    assert (status, headers["x-served-by"]) == (200, "cloud")
    assert json.loads(raw)["usage"]["completion_tokens"] == TOKENS
    assert worker.metric("edge_proxy_cloud_requests_total", outcome="cancelled") == before


def test_the_gateways_own_cancel_still_stops_the_worker(broker, gateway, worker):
    """The client goes away mid-stream: the gateway's sealed cancel on its own topic is obeyed."""
    before = worker.metric("edge_proxy_cloud_requests_total", outcome="cancelled")

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{gateway.url}/v1/chat/completions", json=chat(stream=True)) as r:
                assert r.headers["x-served-by"] == "cloud"
                await r.content.readline()  # the first event: the worker is serving it

    run(main())
    wait_for(lambda: worker.metric("edge_proxy_cloud_requests_total", outcome="cancelled") == before + 1,
             what="the worker's cancelled request")


def test_a_worker_answers_only_the_gateway_a_request_names(broker, worker):
    """Sealed requests naming another gateway's reply topic, and bare ones, get no answer at all."""
    async def main():
        spy = MqttClient(mqtt_config(broker.url), "spy")
        got: list[Message] = []
        await spy.start()
        assert await spy.wait_connected(10)
        await spy.subscribe("edge/+/offload/reply", got.append, qos=1)
        topic = "edge/offload/request"
        for n, (key, gateway, reply_to) in enumerate(((KEY, "gw-a", "edge/gw-b/offload/reply"), (KEY, None, "edge/gw-b/offload/reply"),
                                                      (KEY, "gw-a/x", None), (None, "gw-b", "edge/gw-b/offload/reply"))):
            payload = protocol.encode_request(request_id=f"gw-a.{n}", gateway=gateway, reply_to=reply_to, timeout_s=10,
                                              kind="completion", model="m", prompt={"prompt": "x"}, params={"max_tokens": 2})
            spy.publish(topic, protocol.seal(key, topic, payload), qos=1)
        # The worker has dealt with all four (its counters say so) ...
        while (worker.metric("edge_proxy_cloud_requests_total", outcome="rejected"),
               worker.metric("edge_proxy_cloud_requests_total", outcome="unauthenticated")) != (rejected + 3, unauthenticated + 1):
            await asyncio.sleep(0.02)
        # ... and anything it sent before that reaches the spy before a marker sent after it.
        marker = asyncio.get_running_loop().create_future()
        await spy.subscribe("spy/marker", lambda m: marker.done() or marker.set_result(None), qos=1)
        spy.publish("spy/marker", b"", qos=1)
        await asyncio.wait_for(marker, 10)
        await spy.stop()
        return got

    rejected = worker.metric("edge_proxy_cloud_requests_total", outcome="rejected")
    unauthenticated = worker.metric("edge_proxy_cloud_requests_total", outcome="unauthenticated")
    assert run(main()) == []


def test_a_gateway_without_a_secret_publishes_no_prompt(broker, tiny_model_dir, sockets):
    """No secret, no allow_unauthenticated: the router never offloads (served locally, even when
    everything should go to the cloud), so nothing reaches the request topic; telemetry says why."""
    async def main(gw: Gateway):
        spy = MqttClient(mqtt_config(broker.url), "spy-nosecret")
        seen: list[Message] = []
        await spy.start()
        assert await spy.wait_connected(10)
        await spy.subscribe("edge/offload/request", seen.append, qos=1)
        try:
            return await post(f"{gw.url}/v1/chat/completions", chat(stream=False)), seen
        finally:
            await spy.stop()

    with Engine(tiny_model_dir, sockets / "nosecret.sock") as local, \
            Gateway(ProxyConfig(engine_socket=str(local.socket_path), model_aliases=("tiny",)),
                    settings(broker.url, "gw-nosecret", offload={**FORCE_OFFLOAD, "secret": None})) as gw:
        (status, headers, _), seen = run(main(gw))
        assert (status, headers["x-served-by"]) == (200, "local") and seen == []
        assert gw.services.counters()["offload_auth"] == "refused"


def test_without_a_secret_a_worker_refuses_to_start_unless_a_lab_allows_it(tmp_path):
    broker = {"mqtt": {"url": "mqtt://127.0.0.1:1"}}
    with pytest.raises(ConfigError, match=r"\[offload\] secret: a cloud worker needs the fleet's offload secret"):
        load_settings(broker, None, role="cloud", environ={})
    assert load_settings(broker, None, environ={}).offload_key() is None  # a gateway starts, and does not offload
    lab = load_settings({**broker, "offload": {"allow_unauthenticated": True}}, None, role="cloud", environ={})
    assert lab.offload_key() is None
    assert load_settings(broker, None, environ={"EDGE_OFFLOAD_SECRET": OFFLOAD_SECRET}).offload_key() == KEY
    secret_file = tmp_path / "offload.secret"
    secret_file.write_text(OFFLOAD_SECRET + "\n")
    from_file = load_settings({**broker, "offload": {"secret_file": str(secret_file)}}, None, role="cloud", environ={})
    assert from_file.offload_key() == KEY and OFFLOAD_SECRET not in repr(from_file)
    with pytest.raises(ConfigError, match="at least 32 bytes") as short:
        load_settings(broker, None, environ={"EDGE_OFFLOAD_SECRET": "hunter2"})
    assert "hunter2" not in str(short.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({**broker, "offload": {"secret_file": str(tmp_path / "missing")}}, None, environ={})
