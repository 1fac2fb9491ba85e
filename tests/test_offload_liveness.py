"""Liveness in the offload protocol (docs/reliability.md): heartbeats in the reply stream (a
silent worker, a lost chunk), a request id run once by a worker, presence through a worker's
life, and a breaker that a peer announcing itself lets probe at once."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from engine_harness import Engine
from gateway_harness import OFFLOAD_SECRET, Gateway, mqtt_config, post, run, settings, wait_for

from proxy.config import ProxyConfig
from proxy.core.breaker import HALF_OPEN, OPEN, Breaker
from proxy.mqtt import Message, MqttClient, Topics
from proxy.offload import OffloadFailed, ReplyAssembler, protocol

KEY = OFFLOAD_SECRET.encode()


def accepted(heartbeat_s: float | None = 0.1) -> dict:
    return {"type": "accepted", "worker": "w1", **({"heartbeat_s": heartbeat_s} if heartbeat_s else {})}


def token(text: str) -> dict:
    return {"type": "token", "text": text, "worker": "w1"}


def heartbeat() -> dict:
    return {"type": "heartbeat", "worker": "w1"}


async def first_failure(assembler: ReplyAssembler, peer_timeout_s: float | None, idle_s: float = 30.0) -> OffloadFailed:
    with pytest.raises(OffloadFailed) as failed:
        async for _ in assembler.frames(5.0, idle_s, peer_timeout_s):
            pass
    return failed.value


def test_a_worker_that_promised_heartbeats_and_falls_silent_fails_fast():
    async def main():
        a = ReplyAssembler("r")
        a.feed(0, accepted())
        a.feed(1, token("x"))
        started = time.monotonic()
        failure = await first_failure(a, peer_timeout_s=0.3)
        return failure, time.monotonic() - started

    failure, waited = run(main())
    assert failure.reason == "silent" and "heartbeat" in failure.message
    assert waited < 5.0  # the idle timeout (30 s) was not waited for


def test_heartbeats_keep_a_slow_answer_alive_past_the_peer_timeout():
    async def main():
        a = ReplyAssembler("r")
        a.feed(0, accepted())

        async def worker():
            for _ in range(6):  # 0.6 s of heartbeats, twice the peer timeout
                await asyncio.sleep(0.1)
                a.feed(0, heartbeat())
            a.feed(1, token("late"))
            a.feed(2, {"type": "done", "finish_reason": "stop", "usage": {}, "worker": "w1"})

        feeding = asyncio.ensure_future(worker())
        frames = [f async for f in a.frames(5.0, 30.0, 0.3)]
        await feeding
        return frames

    assert [f["type"] for f in run(main())] == ["token", "done"]


def test_a_worker_without_heartbeats_gets_the_idle_timeout():
    async def main():
        a = ReplyAssembler("r")
        a.feed(0, accepted(heartbeat_s=None))
        return await first_failure(a, peer_timeout_s=0.05, idle_s=0.3)

    assert run(main()).reason == "timeout"


def test_a_chunk_named_by_two_heartbeats_and_still_missing_was_lost():
    async def main():
        a = ReplyAssembler("r")
        a.feed(0, accepted())
        a.feed(1, token("a"))
        a.feed(2, heartbeat())  # chunk 2 was sent: it may still be on its way
        a.feed(2, heartbeat())  # and still missing at the next heartbeat: lost
        return [f async for f in _until_failure(a)]

    frames = run(main())
    assert frames[0]["text"] == "a" and isinstance(frames[-1], OffloadFailed) and frames[-1].reason == "lost"


def test_a_chunk_overtaken_once_by_its_heartbeat_is_no_loss():
    async def main():
        a = ReplyAssembler("r")
        a.feed(0, accepted())
        a.feed(1, heartbeat())
        a.feed(1, token("a"))
        a.feed(1, heartbeat())
        a.feed(2, {"type": "done", "finish_reason": "stop", "usage": {}, "worker": "w1"})
        return [f async for f in a.frames(5.0, 30.0, 1.0)]

    assert [f["type"] for f in run(main())] == ["token", "done"]


async def _until_failure(a: ReplyAssembler):
    try:
        async for frame in a.frames(5.0, 30.0, 5.0):
            yield frame
    except OffloadFailed as exc:
        yield exc


def test_a_peer_announcing_itself_lets_an_open_breaker_probe_at_once():
    now = [0.0]
    breaker = Breaker("cloud", failures=1, cooldown_s=60, clock=lambda: now[0])
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    breaker.probe_now()
    assert breaker.state == HALF_OPEN and breaker.allow() and not breaker.allow()  # one probe
    breaker.success()
    assert breaker.allow()


def test_presence_payloads_are_sealed_and_an_empty_one_means_gone():
    topic = Topics().offload_presence("cloud-1")
    assert topic == "edge/offload/worker/cloud-1"
    sealed = protocol.seal(KEY, topic, protocol.presence_payload(protocol.ONLINE, "host-w1"))
    assert protocol.parse_presence(KEY, topic, sealed) == (protocol.ONLINE, "host-w1")
    assert protocol.parse_presence(KEY, topic, b"") == (protocol.GONE, None)
    with pytest.raises(protocol.Unauthenticated):
        protocol.parse_presence(KEY, topic, protocol.presence_payload(protocol.ONLINE, "host-w1"))
    with pytest.raises(protocol.Unauthenticated):  # sealed for another worker's topic
        protocol.parse_presence(KEY, Topics().offload_presence("cloud-2"), sealed)


# -- with a broker and a real worker ---------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(broker, tiny_model_dir):
    """A cloud worker whose engine serves one request at a time, ~20 ms a token."""
    with tempfile.TemporaryDirectory(prefix="live-", dir="/tmp") as d, \
            Engine(tiny_model_dir, Path(d) / "cloud.sock", max_batch=1, delay_s=0.02) as engine, \
            Gateway(ProxyConfig(engine_socket=str(engine.socket_path)), settings(broker.url, role="cloud")) as w:
        yield w


class Spy:
    """A gateway of the fleet played by hand: publishes sealed requests, collects the chunks."""

    def __init__(self, url: str, gateway: str) -> None:
        self.client = MqttClient(mqtt_config(url), f"spy-{gateway}")
        self.gateway = gateway
        self.reply_to = Topics().offload_reply(gateway)
        self.chunks: dict[str, list[dict]] = {}
        self.done: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> Spy:
        await self.client.start()
        assert await self.client.wait_connected(10)
        await self.client.subscribe(self.reply_to, self._on_chunk, qos=1)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.stop()

    def ask(self, request_id: str, max_tokens: int, heartbeat_s: float | None = None) -> None:
        topic = Topics().offload_request()
        payload = protocol.encode_request(request_id=request_id, gateway=self.gateway, reply_to=self.reply_to, timeout_s=30,
                                          kind="completion", model="m", prompt={"prompt": "the quick brown fox"},
                                          params={"max_tokens": max_tokens, "ignore_eos": True},
                                          extra={"heartbeat_s": heartbeat_s})
        self.done.setdefault(request_id, asyncio.Event())
        self.client.publish(topic, protocol.seal(KEY, topic, payload), qos=1)

    def _on_chunk(self, message: Message) -> None:
        chunk = protocol.unseal(KEY, message.topic, message.payload)
        self.chunks.setdefault(chunk["id"], []).append(chunk)
        if chunk["type"] in protocol.TERMINAL:
            self.done.setdefault(chunk["id"], asyncio.Event()).set()


def test_a_worker_runs_a_request_id_once(broker, worker):
    """The same request delivered again after it was served (a redelivery) is not run again."""
    async def main():
        async with Spy(broker.url, "gw-once") as spy:
            spy.ask("gw-once.1", 3)
            await spy.done["gw-once.1"].wait()
            spy.ask("gw-once.1", 3)  # again
            spy.ask("gw-once.2", 3)  # after it: its answer comes after any answer to the repeat
            await spy.done["gw-once.2"].wait()
            return spy.chunks

    served = worker.metric("edge_proxy_cloud_requests_total", outcome="served")
    chunks = run(main())
    assert [c["type"] for c in chunks["gw-once.1"]].count("accepted") == 1
    assert [c["type"] for c in chunks["gw-once.1"]].count("done") == 1
    assert worker.metric("edge_proxy_cloud_requests_total", outcome="served") == served + 2


def test_a_worker_sends_heartbeats_while_a_request_waits_in_its_engine(broker, worker):
    """Two requests asking for heartbeats; the engine serves one at a time: the second waits,
    and its gateway hears a heartbeat (naming chunk 0) every heartbeat_s meanwhile."""
    async def main():
        async with Spy(broker.url, "gw-beat") as spy:
            spy.ask("gw-beat.long", 40, heartbeat_s=0.1)
            spy.ask("gw-beat.waiting", 3, heartbeat_s=0.1)
            await spy.done["gw-beat.long"].wait()
            await spy.done["gw-beat.waiting"].wait()
            return spy.chunks["gw-beat.waiting"]

    chunks = run(main())
    assert chunks[0]["type"] == "accepted" and chunks[0]["heartbeat_s"] == 0.1
    beats = [c for c in chunks if c["type"] == "heartbeat"]
    assert len(beats) >= 2 and all(c["seq"] == 0 for c in beats)
    assert chunks[-1]["type"] == "done"


def test_presence_follows_a_workers_life(broker, tiny_model_dir, tmp_path):
    """A gateway sees a worker online as it connects, and gone at its clean stop."""
    with Engine(tiny_model_dir, tmp_path / "p.sock") as engine, \
            Gateway(ProxyConfig(engine_socket=str(engine.socket_path)), settings(broker.url, "gw-presence",
                                                                                 fleet={"topic_prefix": "pres"})) as gw:
        offloader = gw.services.offloader
        assert gw.run(lambda: offloader.workers_online) == 0
        w = Gateway(ProxyConfig(engine_socket=str(engine.socket_path)),
                    settings(broker.url, role="cloud", fleet={"topic_prefix": "pres"})).__enter__()
        try:
            wait_for(lambda: gw.run(lambda: offloader.workers_online) == 1, what="the worker online")
        finally:
            w.__exit__(None, None, None)
        wait_for(lambda: gw.run(lambda: offloader.workers_online) == 0, what="the worker gone")


def test_a_gateway_that_never_met_its_engine_is_ready_by_the_cloud_and_lists_its_models(broker, worker, tmp_path):
    """The engine is down from the start, a worker is online: /readyz says ready (cloud) before
    any offload, /v1/models lists the configured names, and a request is served by the cloud."""
    config = ProxyConfig(engine_socket=str(tmp_path / "never.sock"), model_aliases=("tiny",))
    with Gateway(config, settings(broker.url, "gw-never")) as gw:
        wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) >= 1, what="the worker's presence")

        async def main():
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{gw.url}/readyz") as r:
                    ready = (r.status, await r.json())
                async with s.get(f"{gw.url}/v1/models") as r:
                    models = (r.status, [m["id"] for m in (await r.json())["data"]])
                answer = await post(f"{gw.url}/v1/chat/completions",
                                    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            return ready, models, answer

        ready, models, (status, headers, _) = run(main())
    assert ready == (200, {"status": "ready", "route": "cloud"})
    assert models == (200, ["tiny"])
    assert (status, headers["x-served-by"]) == (200, "cloud")


def test_readyz_names_why_every_path_refuses(broker, tmp_path):
    """The engine is down and no worker is online (another topic prefix): 503, with both reasons."""
    config = ProxyConfig(engine_socket=str(tmp_path / "never.sock"), model_aliases=("tiny",))
    with Gateway(config, settings(broker.url, "gw-alone", fleet={"topic_prefix": "alone"})) as gw:
        async def main():
            async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/readyz") as r:
                return r.status, r.headers.get("Retry-After"), await r.json()

        status, retry_after, body = run(main())
    assert (status, retry_after) == (503, "1")
    assert body == {"status": "unavailable", "reason": "the engine is unreachable; no cloud worker is online"}
