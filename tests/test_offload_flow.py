"""Offload end to end against a real Mosquitto: gateways (the real sidecar with its MQTT side) in
front of real engines on the tiny model, cloud workers (`--role cloud`, in-process or as a
process to SIGKILL), and a scripted worker that sends chunks shuffled and twice."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from engine_harness import Engine
from gateway_harness import (
    FORCE_OFFLOAD,
    OFFLOAD_SECRET,
    Gateway,
    kill,
    mqtt_config,
    post,
    run,
    settings,
    sse_text,
    wait_for,
    worker_process,
)

from proxy.config import ProxyConfig
from proxy.mqtt import MessageProperties, MqttClient, Topics
from proxy.offload import protocol

USER = [{"role": "user", "content": "the quick brown fox"}]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"



@pytest.fixture(scope="module")
def sockets():
    with tempfile.TemporaryDirectory(prefix="off-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def cloud_engine(tiny_model_dir, sockets):
    with Engine(tiny_model_dir, sockets / "cloud.sock", max_batch=4, queue_size=64) as e:
        yield e


@pytest.fixture(scope="module")
def cloud_worker(broker, cloud_engine):
    """One cloud worker (the sidecar in role cloud) with its own engine."""
    with Gateway(ProxyConfig(engine_socket=str(cloud_engine.socket_path)), settings(broker.url, role="cloud")) as w:
        yield w


def proxy_config(engine: Engine, **kw) -> ProxyConfig:
    return ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",), **kw)


def chat(stream: bool, max_tokens: int = 12, **kw) -> dict:
    return {"model": "tiny", "messages": USER, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream, **kw}


def test_an_overloaded_engine_sends_the_excess_to_the_cloud(broker, cloud_worker, tiny_model_dir, sockets):
    """One KV slot and one queue place: of 8 requests at once, the engine can hold 2; the rest
    are offloaded (reason busy) and every one completes, in the same shapes a local answer has."""
    with Engine(tiny_model_dir, sockets / "busy.sock", max_batch=1, queue_size=1, delay_s=0.01) as engine, \
            Gateway(proxy_config(engine), settings(broker.url)) as gw:

        async def main():
            bodies = [chat(stream=i % 2 == 0, max_tokens=16) for i in range(8)]
            return await asyncio.gather(*(post(f"{gw.url}/v1/chat/completions", b) for b in bodies))

        answers = run(main())
        served = [headers["x-served-by"] for _, headers, _ in answers]
        assert [status for status, _, _ in answers] == [200] * 8, answers
        assert "cloud" in served and "local" in served, served
        for (_, _, raw), i in zip(answers, range(8), strict=True):
            if i % 2 == 0:
                text, events = sse_text(raw)
                assert raw.endswith(b"data: [DONE]\n\n") and events[-1]["choices"][0]["finish_reason"] == "length"
                assert events[0]["object"] == "chat.completion.chunk" and text
            else:
                import json

                body = json.loads(raw)
                assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 16
                assert body["choices"][0]["finish_reason"] == "length"
        assert gw.metric("edge_proxy_offloads_total", reason="busy") == served.count("cloud")
        assert gw.metric("edge_proxy_routed_requests_total", route="cloud", front="http") == served.count("cloud")
        assert cloud_worker.metric("edge_proxy_cloud_requests_total", outcome="served") >= served.count("cloud")


def test_a_stopped_engine_sends_everything_to_the_cloud(broker, cloud_worker, tiny_model_dir, sockets):
    engine = Engine(tiny_model_dir, sockets / "stopping.sock").__enter__()
    with Gateway(proxy_config(engine), settings(broker.url, offload={"breaker_failures": 2})) as gw:
        wait_for(lambda: gw.sidecar.link.model is not None, what="the engine link")
        engine.stop()

        async def main():
            answers = [await post(f"{gw.url}/v1/chat/completions", chat(stream=i == 1)) for i in range(4)]
            async with __import__("aiohttp").ClientSession() as s, s.get(f"{gw.url}/readyz") as r:
                ready = (r.status, await r.json())
            return answers, ready

        answers, ready = run(main())
        assert [(s, h["x-served-by"]) for s, h, _ in answers] == [(200, "cloud")] * 4
        assert ready == (200, {"status": "ready", "route": "cloud"})
        # The first failures were "unreachable"; then the local breaker opened and requests skip it.
        assert gw.metric("edge_proxy_offloads_total", reason="unreachable") >= 1
        assert gw.metric("edge_proxy_offloads_total", reason="breaker") >= 1
        assert gw.metric("edge_proxy_breaker_state", path="local") == 1


def test_a_worker_killed_mid_stream_gives_an_error_event_or_a_local_retry(broker, tiny_model_dir, sockets, tmp_path):
    """The worker process is SIGKILLed while it streams: the streaming client gets an error event
    and [DONE] as soon as the broker publishes the worker's Will (well before idle_timeout_s); a
    plain request in flight is answered by the local engine instead."""
    with Engine(tiny_model_dir, sockets / "slowcloud.sock", max_batch=2, delay_s=0.03) as slow_cloud, \
            Engine(tiny_model_dir, sockets / "local3.sock") as local, \
            Gateway(proxy_config(local), settings(broker.url, "gw-kill", offload={**FORCE_OFFLOAD, "idle_timeout_s": 2.0},
                                                  fleet={"topic_prefix": "killtest"})) as gw:
        log = tmp_path / "worker.log"
        config = tmp_path / "worker.toml"
        config.write_text('[fleet]\ntopic_prefix = "killtest"\n')
        worker = worker_process(broker.url, slow_cloud.socket_path, log, "--config", str(config))
        try:
            wait_for(lambda: b"cloud worker subscriptions acknowledged" in log.read_bytes(), what="the worker's SUBACKs")

            async def main():
                plain = asyncio.ensure_future(post(f"{gw.url}/v1/chat/completions", chat(stream=False, max_tokens=120)))
                import aiohttp

                async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/chat/completions",
                                                                json=chat(stream=True, max_tokens=120)) as r:
                    assert r.status == 200 and r.headers["x-served-by"] == "cloud"
                    first = await r.content.readline()
                    while not first.startswith(b"data: "):
                        first = await r.content.readline()
                    while gw.metric("edge_proxy_offloads_in_flight") < 2:  # the plain request is offloaded too
                        await asyncio.sleep(0.02)
                    kill(worker)
                    started = time.monotonic()
                    rest = await r.content.read()
                    waited = time.monotonic() - started
                return first + rest, waited, await plain

            raw, waited, (status, headers, body) = run(main())
            _, events = sse_text(raw)
            assert raw.endswith(b"data: [DONE]\n\n")
            error = events[-1]["error"]
            assert error["code"] == "offload_interrupted" and "cut off" in error["message"]
            assert waited < 2.0  # idle_timeout_s
            assert (status, headers["x-served-by"]) == (200, "local"), body
            assert gw.metric("edge_proxy_offload_fallbacks_total") == 1
            assert gw.metric("edge_proxy_offload_failures_total", reason="worker_lost") == 2
        finally:
            kill(worker)


class ScriptedWorker:
    """A stand-in cloud worker on a raw MQTT client: answers every request with `tokens`, the
    chunks shuffled and some sent twice; or, with `stall_after`, stops after that many tokens."""

    def __init__(self, url: str, tokens: list[str], *, stall_after: int | None = None, seed: int = 3,
                 prefix: str = "edge") -> None:
        self.client = MqttClient(mqtt_config(url), f"scripted-{seed}")
        self.topics = Topics(prefix)
        self.tokens = tokens
        self.stall_after = stall_after
        self.rng = random.Random(seed)
        self.requests: list[tuple[dict, MessageProperties]] = []

    async def start(self) -> None:
        subscribed = self.client.subscribe(self.topics.offload_request("scripted"), self._on_request, qos=1)
        await self.client.start()
        assert await self.client.wait_connected(10)
        await asyncio.wait_for(subscribed, 10)  # the SUBACK: from now on requests reach this worker

    def _on_request(self, message) -> None:
        request = protocol.unseal(OFFLOAD_SECRET.encode(), message.topic, message.payload)
        self.requests.append((request, message.properties))
        reply_to = message.properties.response_topic or request["reply_to"]
        rid = request["id"]
        frames = [{"type": "accepted"}] + [{"type": "token", "text": t} for t in self.tokens]
        if self.stall_after is not None:
            frames = frames[:1 + self.stall_after]
        else:
            frames.append({"type": "done", "finish_reason": "stop",
                           "usage": {"prompt_tokens": 3, "completion_tokens": len(self.tokens), "total_tokens": 3 + len(self.tokens)}})
        sends = list(enumerate(frames))
        sends += self.rng.sample(sends, max(1, len(sends) // 3))  # duplicates
        self.rng.shuffle(sends)
        if self.stall_after is not None:
            sends.sort(key=lambda s: s[0])
        props = MessageProperties(content_type=protocol.CONTENT_TYPE, correlation_data=rid.encode())
        for seq, frame in sends:
            chunk = protocol.encode_chunk(rid, seq, frame, "scripted")
            self.client.publish(reply_to, protocol.seal(OFFLOAD_SECRET.encode(), reply_to, chunk), qos=1, properties=props)

    async def stop(self) -> None:
        await self.client.stop()


@pytest.mark.parametrize("protocol_version", ["5", "3.1.1"])
def test_shuffled_and_duplicated_chunks_are_reordered_and_deduplicated(broker, tiny_model_dir, sockets, protocol_version):
    """Over MQTT v5 the request's reply topic and id travel as properties; over 3.1.1 in the payload."""
    tokens = [f"w{i} " for i in range(15)]
    with Engine(tiny_model_dir, sockets / f"local-{protocol_version}.sock") as local, \
            Gateway(proxy_config(local), settings(broker.url, f"gw-s{protocol_version.replace('.', '')}", offload=FORCE_OFFLOAD,
                                                  mqtt={"protocol": protocol_version}, fleet={"topic_prefix": "scripted"})) as gw:
        worker = ScriptedWorker(broker.url, tokens, seed=len(protocol_version), prefix="scripted")

        async def main():
            await worker.start()
            try:
                plain = await post(f"{gw.url}/v1/chat/completions", chat(stream=False), headers={"traceparent": TRACEPARENT})
                streamed = await post(f"{gw.url}/v1/completions", {"model": "tiny", "prompt": "hi", "stream": True,
                                                                  "max_tokens": 15, "temperature": 0.5})
            finally:
                await worker.stop()
            return plain, streamed

        plain, streamed = run(main())
        import json

        assert plain[0] == 200 and plain[1]["x-served-by"] == "cloud"
        body = json.loads(plain[2])
        assert body["choices"][0]["message"]["content"] == "".join(tokens) and body["usage"]["completion_tokens"] == 15
        text, events = sse_text(streamed[2])
        assert streamed[0] == 200 and text == "".join(tokens) and events[-1]["choices"][0]["finish_reason"] == "stop"
        assert gw.metric("edge_proxy_offload_chunks_dropped_total", reason="duplicate") >= 2
        request, props = worker.requests[0]
        assert request["reply_to"] == f"scripted/{gw.services.gateway_id}/offload/reply" and request["timeout_s"] == 120
        if protocol_version == "5":
            assert props.response_topic == request["reply_to"] and props.correlation_data == request["id"].encode()
            assert 0 < props.message_expiry_s <= 120 and ("traceparent", TRACEPARENT) in props.user_properties
        else:
            assert props.response_topic is None and request["deadline"] > time.time()
            assert request["trace"] == {"traceparent": TRACEPARENT}  # the trace context crosses the offload


def test_a_broker_drop_fails_offloads_over_to_the_local_engine(mqtt_broker, tiny_model_dir, sockets):
    """The worker answers a few tokens, then the broker goes away: the plain request is served
    locally; the streamed one, already under way, ends with a clear error event."""
    b = mqtt_broker()
    with Engine(tiny_model_dir, sockets / "local-drop.sock") as local, \
            Gateway(proxy_config(local), settings(b.url, "gw-drop", offload={**FORCE_OFFLOAD, "idle_timeout_s": 30})) as gw:
        worker = ScriptedWorker(b.url, ["x "] * 10, stall_after=3)

        async def main():
            await worker.start()
            plain = asyncio.ensure_future(post(f"{gw.url}/v1/chat/completions", chat(stream=False)))
            three_tokens = asyncio.Event()
            streamed = asyncio.ensure_future(_stream(f"{gw.url}/v1/chat/completions", chat(stream=True), 3, three_tokens))
            while len(worker.requests) < 2:
                await asyncio.sleep(0.05)
            await three_tokens.wait()  # the worker's tokens reached the streaming client
            await asyncio.to_thread(b.stop)
            answers = await asyncio.gather(plain, streamed)
            await worker.stop()
            return answers

        (status, headers, _), (s_status, _, raw) = run(main())
        assert (status, headers["x-served-by"]) == (200, "local")
        text, events = sse_text(raw)
        assert s_status == 200 and text == "x x x " and events[-1]["error"]["code"] == "offload_interrupted"
        assert gw.metric("edge_proxy_offload_failures_total", reason="lost") == 2


async def _stream(url: str, body: dict, tokens: int, got_them: asyncio.Event) -> tuple[int, dict, bytes]:
    """post() for a stream, setting `got_them` once `tokens` content events have arrived."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(url, json=body) as r:
        raw = b""
        async for line in r.content:
            raw += line
            if len(sse_text(raw)[0].split()) >= tokens:
                got_them.set()
        return r.status, dict(r.headers), raw


def test_with_neither_path_the_answer_is_503_with_retry_after(broker, tiny_model_dir, sockets):
    """The engine is down and no worker listens (another share group): the offload times out,
    then the cloud breaker opens and requests are refused at once."""
    engine = Engine(tiny_model_dir, sockets / "gone.sock").__enter__()
    offload = {"accept_timeout_s": 0.5, "breaker_failures": 2, "breaker_cooldown_s": 30}
    with Gateway(proxy_config(engine), settings(broker.url, "gw-none", offload=offload,
                                                fleet={"topic_prefix": "lonely"})) as gw:
        wait_for(lambda: gw.sidecar.link.model is not None, what="the engine link")
        engine.stop()

        async def main():
            return [await post(f"{gw.url}/v1/chat/completions", chat(stream=i == 2)) for i in range(3)]

        started = time.monotonic()
        answers = run(main())
        assert time.monotonic() - started < 10
        codes = [(status, __import__("json").loads(body)["error"]["code"]) for status, _, body in answers]
        assert codes == [(503, "cloud_unavailable"), (503, "cloud_unavailable"), (503, "no_capacity")]
        assert all(int(headers["Retry-After"]) >= 1 for _, headers, _ in answers)
        assert int(answers[2][1]["Retry-After"]) > 20  # the cloud breaker's cool-down
        assert gw.metric("edge_proxy_breaker_state", path="cloud") == 1


def test_thermal_and_wait_bounds_offload_and_device_requests_take_the_same_path(broker, cloud_worker, tiny_model_dir, sockets):
    with Engine(tiny_model_dir, sockets / "hot.sock") as local, \
            Gateway(proxy_config(local), settings(broker.url, "gw-hot", offload={"max_cpu_temp_c": 80, "max_wait_s": 1,
                                                                                  "status_interval_s": 0.1},
                                                       devices={"enabled": True, "require_grant": False})) as gw:
        temperature = [95.0]
        gw.run(setattr, gw.router.health, "read_temperature", lambda: temperature[0])
        wait_for(lambda: gw.router.health.cpu_temp_c == 95.0, what="a sensor reading")
        status, headers, _ = run(post(f"{gw.url}/v1/chat/completions", chat(stream=False)))
        assert (status, headers["x-served-by"]) == (200, "cloud")
        assert gw.metric("edge_proxy_offloads_total", reason="thermal") == 1

        temperature[0] = 40.0
        wait_for(lambda: gw.router.health.cpu_temp_c == 40.0, what="a sensor reading")
        status, headers, _ = run(post(f"{gw.url}/v1/chat/completions", chat(stream=False)))
        assert (status, headers["x-served-by"]) == (200, "local")

        gw.run(setattr, gw.router.health, "link", _FakeStatus(7.5))  # the engine says: a 7.5 s queue
        wait_for(lambda: gw.router.health.wait_s(5) == 7.5, what="a status reading")

        async def device():
            client = MqttClient(mqtt_config(broker.url), "dev-hot")
            got: asyncio.Queue = asyncio.Queue()
            subscribed = client.subscribe("edge/gw-hot/infer/reply/dev-hot", lambda m: got.put_nowait(m), qos=1)
            await client.start()
            await client.wait_connected(10)
            await asyncio.wait_for(subscribed, 10)  # the SUBACK: the reply cannot be missed
            client.publish("edge/gw-hot/infer/request/dev-hot", msgpack.packb({"id": "d1", "prompt": "hello", "max_tokens": 5}), qos=1,
                           properties=MessageProperties(response_topic="edge/gw-hot/infer/reply/dev-hot"))
            message = await asyncio.wait_for(got.get(), 20)
            await client.stop()
            return msgpack.unpackb(message.payload)

        reply = run(device())
        assert reply["type"] == "result" and reply["served_by"] == "cloud" and reply["id"] == "d1"
        assert gw.metric("edge_proxy_offloads_total", reason="wait") == 1
        assert gw.metric("edge_proxy_routed_requests_total", route="cloud", front="mqtt") == 1


class _FakeStatus:
    def __init__(self, wait: float) -> None:
        self.wait = wait

    async def status(self, timeout_s: float = 1.0):
        return {"estimated_wait_s": self.wait}


def test_a_worker_can_forward_to_an_openai_compatible_upstream(broker, cloud_engine, tiny_model_dir, sockets):
    """Role cloud with `upstream`: here another of our sidecars, as vLLM or TGI would be."""
    from proxy_harness import Proxy

    with Proxy(ProxyConfig(engine_socket=str(cloud_engine.socket_path))) as upstream, \
            Gateway(ProxyConfig(), settings(broker.url, role="cloud", cloud={"upstream": f"{upstream.url}/v1"},
                                            fleet={"topic_prefix": "upstream"})) as worker, \
            Engine(tiny_model_dir, sockets / "local-up.sock") as local, \
            Gateway(proxy_config(local), settings(broker.url, "gw-up", offload=FORCE_OFFLOAD,
                                                  fleet={"topic_prefix": "upstream"})) as gw:
        async def main():
            plain = await post(f"{gw.url}/v1/chat/completions", chat(stream=False, max_tokens=7))
            streamed = await post(f"{gw.url}/v1/completions", {"model": "tiny", "prompt": "the quick", "max_tokens": 5,
                                                              "ignore_eos": True, "stream": True})
            return plain, streamed

        (status, headers, raw), (s_status, s_headers, s_raw) = run(main())
        import json

        body = json.loads(raw)
        assert (status, headers["x-served-by"]) == (200, "cloud") and body["usage"]["completion_tokens"] == 7
        _, events = sse_text(s_raw)
        assert (s_status, s_headers["x-served-by"]) == (200, "cloud") and events[-1]["choices"][0]["finish_reason"] == "length"
        assert worker.metric("edge_proxy_cloud_requests_total", outcome="served") == 2
        assert upstream.sidecar.metrics.registry.get_sample_value("edge_proxy_tokens_generated_total") == 12


def test_the_safety_filter_screens_offloaded_answers(broker, tiny_model_dir, sockets):
    from proxy.safety import Category, SafetyConfig

    safety = SafetyConfig(categories=(Category("weapons", "block", direction="output", terms=("pipe bomb",)),))
    tokens = ["Here ", "is ", "a ", "pipe ", "bomb ", "recipe"]
    with Engine(tiny_model_dir, sockets / "local-safe.sock") as local, \
            Gateway(proxy_config(local, safety=safety), settings(broker.url, "gw-safe", offload=FORCE_OFFLOAD,
                                                                 fleet={"topic_prefix": "safe"})) as gw:
        worker = ScriptedWorker(broker.url, tokens, prefix="safe", seed=11)

        async def main():
            await worker.start()
            try:
                return [await post(f"{gw.url}/v1/chat/completions", chat(stream=s)) for s in (False, True)]
            finally:
                await worker.stop()

        (status, headers, raw), (s_status, _, s_raw) = run(main())
        import json

        body = json.loads(raw)
        assert (status, headers["x-served-by"]) == (200, "cloud")
        assert body["choices"][0]["finish_reason"] == "content_filter" and "bomb" not in body["choices"][0]["message"]["content"]
        text, events = sse_text(s_raw)
        assert s_status == 200 and "bomb" not in text and events[-1]["choices"][0]["finish_reason"] == "content_filter"
