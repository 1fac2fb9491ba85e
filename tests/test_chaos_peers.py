"""The fault suite for peers (docs/reliability.md), as an operator would see it: real Mosquitto
brokers, real engines (as processes where a test SIGKILLs them), real cloud workers and
gateways, bounded load on loopback. Each test asserts the outcome: no request lost that had not
started, no request waiting on a dead peer past its bound, and /readyz agreeing with a request
sent at the same moment. The figures (failover times, readiness agreement) are printed at the
end of the module (`pytest -m chaos -s tests/test_chaos_peers.py`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import pytest
from engine_harness import Engine
from gateway_harness import (
    FORCE_OFFLOAD,
    OFFLOAD_SECRET,
    ROOT,
    Gateway,
    kill,
    run,
    settings,
    wait_for,
    worker_process,
)

from proxy.broker_settings import MqttSettings
from proxy.config import ProxyConfig
from proxy.mqtt import MqttConfig

pytestmark = pytest.mark.chaos

USER = [{"role": "user", "content": "the quick brown fox"}]
FIGURES: dict[str, list[float]] = {}  # what the faults cost, reported at the end of the module
AGREEMENT: list[bool] = []  # /readyz against a request sent at the same moment, every sample of the module


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    lines = [f"  {name}: max {max(values):.3f} s over {len(values)}" for name, values in sorted(FIGURES.items()) if values]
    if AGREEMENT:
        lines.append(f"  /readyz agreed with a request sent with it: {sum(AGREEMENT)}/{len(AGREEMENT)}")
    print("\nchaos figures:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def sockets():
    with tempfile.TemporaryDirectory(prefix="chaos-", dir="/tmp") as d:
        yield Path(d)


def chat(stream: bool, max_tokens: int, **kw) -> dict:
    return {"model": "tiny", "messages": USER, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream, **kw}


def proxy_config(socket_path: Path, **kw) -> ProxyConfig:
    return ProxyConfig(engine_socket=str(socket_path), model_aliases=("tiny",), **kw)


# -- peers as processes ----------------------------------------------------------------------------

_ENGINE = """
import sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from engine_harness import Engine
Engine(Path(sys.argv[2]), Path(sys.argv[3]), max_batch=int(sys.argv[4]), delay_s=float(sys.argv[5])).__enter__()
print("ready", flush=True)
threading.Event().wait()
"""


def engine_process(model_dir: Path, socket_path: Path, *, max_batch: int, delay_s: float) -> subprocess.Popen:
    """The real engine (server and scheduler, slowed per forward) in a process of its own, to SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", _ENGINE, str(ROOT / "tests"), str(model_dir), str(socket_path),
                             str(max_batch), str(delay_s)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    assert proc.stdout.readline() == b"ready\n", "the engine process did not start"
    return proc


# -- clients ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One request as its client saw it (monotonic times)."""

    status: int = 0
    served_by: str = ""
    first_token_at: float | None = None  # a stream's first text
    ended_at: float = 0.0
    finish_reason: str | None = None
    error: str | None = None  # the error code (the body's, or the stream's error event)
    events: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finish_reason is not None


async def request(session: aiohttp.ClientSession, url: str, body: dict, started: asyncio.Event | None = None) -> Outcome:
    """`started`: set when a stream's first text arrives."""
    out = Outcome()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        out.status, out.served_by = r.status, r.headers.get("x-served-by", "")
        if not body["stream"] or r.status != 200:
            answer = await r.json()
            out.ended_at = time.monotonic()
            if r.status == 200:
                out.finish_reason = answer["choices"][0]["finish_reason"]
            else:
                out.error = answer["error"]["code"]
            return out
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            out.events.append(event)
            if "error" in event:
                out.error = event["error"]["code"]
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content") and out.first_token_at is None:
                    out.first_token_at = time.monotonic()
                    if started is not None:
                        started.set()
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
    out.ended_at = time.monotonic()
    return out


async def readiness_sample(session: aiohttp.ClientSession, url: str) -> bool:
    """GET /readyz and a small request at the same moment: do they agree (200 with 200, 503 with 503)?"""
    async def ready() -> int:
        async with session.get(f"{url}/readyz") as r:
            return r.status

    ready_status, answer = await asyncio.gather(ready(), request(session, url, chat(False, 2)))
    agreed = (ready_status == 200) == answer.ok
    AGREEMENT.append(agreed)
    if not agreed:
        print(f"/readyz {ready_status}, request {answer.status} {answer.error}")
    return agreed


async def sample_readiness(url: str, stop: asyncio.Event) -> list[bool]:
    samples = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            samples.append(await readiness_sample(session, url))
            await asyncio.sleep(0.05)
    return samples


class MovedLog(logging.Handler):
    """When the gateway moved each request to another path (its `request moved` records)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.moved: list[tuple[float, str, str]] = []  # (monotonic time, from, to)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "request moved":
            self.moved.append((time.monotonic(), record.__dict__["from"], record.__dict__["to"]))


@pytest.fixture
def moved_log():
    handler = MovedLog()
    logger = logging.getLogger("proxy.service")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def cloud_engine(tiny_model_dir, sockets):
    with Engine(tiny_model_dir, sockets / "cloud.sock", max_batch=4, queue_size=64) as e:
        yield e


# -- the faults ------------------------------------------------------------------------------------

def test_engine_sigkill_with_offload_on(broker, cloud_engine, tiny_model_dir, sockets, moved_log):
    """The local engine dies under load with a cloud worker online: every request that had not
    started (plain answers in progress, streams waiting for their first token) is served by the
    cloud; streams already started end with an error event within 1 s; /readyz says ready (the
    cloud) as a request sent with it is served."""
    engine = engine_process(tiny_model_dir, sockets / "kill-on.sock", max_batch=3, delay_s=0.02)
    try:
        with Gateway(ProxyConfig(engine_socket=str(cloud_engine.socket_path)), settings(broker.url, role="cloud")), \
                Gateway(proxy_config(sockets / "kill-on.sock"), settings(broker.url, "gw-kill-on")) as gw:
            wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) == 1, what="the worker's presence")
            wait_for(lambda: gw.sidecar.link.connected, what="the engine link")

            async def main():
                stop = asyncio.Event()
                sampler = asyncio.ensure_future(sample_readiness(gw.url, stop))
                async with aiohttp.ClientSession() as session:
                    # Two plain answers first: they are in progress in the engine when it dies.
                    tasks = [asyncio.ensure_future(request(session, gw.url, chat(False, 60))) for _ in range(2)]
                    while gw.metric("edge_proxy_time_to_first_token_seconds_count") < 2:
                        await asyncio.sleep(0.01)
                    started = asyncio.Event()
                    tasks += [asyncio.ensure_future(request(session, gw.url, chat(stream=i % 2 == 0, max_tokens=60), started))
                              for i in range(6)]
                    while gw.metric("edge_proxy_requests_in_flight") < 8:  # (the sampler's may be among them)
                        await asyncio.sleep(0.01)
                    await started.wait()
                    killed_at = time.monotonic()
                    kill(engine)
                    outcomes = await asyncio.gather(*tasks)
                    after = [await readiness_sample(session, gw.url) for _ in range(5)]
                stop.set()
                return killed_at, outcomes, await sampler, after

            killed_at, outcomes, samples, after = run(main())
    finally:
        kill(engine)
    started = [o for o in outcomes if o.first_token_at is not None and o.first_token_at < killed_at and not o.ok]
    unstarted = [o for o in outcomes if o not in started]
    assert all(o.ok for o in unstarted), [(o.status, o.error, o.served_by) for o in unstarted]
    assert any(o.served_by == "cloud" for o in unstarted)
    for o in started:
        assert o.error == "engine_unavailable" and o.ended_at - killed_at < 1.0
        FIGURES.setdefault("engine SIGKILL: started stream's error event after the kill", []).append(o.ended_at - killed_at)
    assert len(moved_log.moved) >= 2  # the plain answers in progress
    for at, source, target in moved_log.moved:
        assert (source, target) == ("local", "cloud")
        FIGURES.setdefault("engine SIGKILL: request moved to the cloud after the kill", []).append(at - killed_at)
    assert all(after), "after the kill, /readyz and requests disagree"


def test_a_hung_engine_is_dropped_by_its_status_heartbeat(broker, cloud_engine, tiny_model_dir, sockets, moved_log):
    """The engine stops (SIGSTOP: its socket stays open, nothing answers): the link's status
    heartbeat drops it within HUNG_AFTER_S (plus one heartbeat), a started stream ends with an
    error event, the plain answer in progress is moved to the cloud."""
    from proxy.core.engine_link import HEARTBEAT_S, HUNG_AFTER_S

    engine = engine_process(tiny_model_dir, sockets / "hung.sock", max_batch=2, delay_s=0.02)
    try:
        with Gateway(ProxyConfig(engine_socket=str(cloud_engine.socket_path)), settings(broker.url, role="cloud")), \
                Gateway(proxy_config(sockets / "hung.sock"), settings(broker.url, "gw-hung")) as gw:
            wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) == 1, what="the worker's presence")

            async def main():
                async with aiohttp.ClientSession() as session:
                    plain = asyncio.ensure_future(request(session, gw.url, chat(False, 200)))
                    while gw.metric("edge_proxy_time_to_first_token_seconds_count") < 1:
                        await asyncio.sleep(0.01)
                    started = asyncio.Event()
                    stream = asyncio.ensure_future(request(session, gw.url, chat(True, 200), started))
                    await started.wait()
                    stopped_at = time.monotonic()
                    os.killpg(engine.pid, signal.SIGSTOP)
                    return stopped_at, await plain, await stream

            stopped_at, plain, stream = run(main())
    finally:
        kill(engine)
    bound = HUNG_AFTER_S + HEARTBEAT_S + 0.5
    assert stream.error == "engine_unavailable" and stream.ended_at - stopped_at < bound, stream
    assert plain.ok and plain.served_by == "cloud", plain
    [(moved_at, source, target)] = moved_log.moved
    assert (source, target) == ("local", "cloud") and moved_at - stopped_at < bound
    FIGURES.setdefault("hung engine (SIGSTOP): dropped by its status heartbeat after", []).append(stream.ended_at - stopped_at)


def test_engine_sigkill_with_offload_off(tiny_model_dir, sockets):
    """No broker: the engine dies under load; started streams end with an error event within
    1 s, every other request is answered 503 with Retry-After at once (none hangs); /readyz
    says unavailable as requests are refused."""
    from proxy_harness import Proxy

    engine = engine_process(tiny_model_dir, sockets / "kill-off.sock", max_batch=2, delay_s=0.02)
    try:
        with Proxy(proxy_config(sockets / "kill-off.sock")) as p:
            async def main():
                async with aiohttp.ClientSession() as session:
                    started = asyncio.Event()
                    tasks = [asyncio.ensure_future(request(session, p.url, chat(stream=i % 2 == 0, max_tokens=60), started))
                             for i in range(6)]
                    await started.wait()
                    killed_at = time.monotonic()
                    kill(engine)
                    outcomes = await asyncio.gather(*tasks)
                    after = [await readiness_sample(session, p.url) for _ in range(5)]
                return killed_at, outcomes, after

            killed_at, outcomes, after = run(main())
    finally:
        kill(engine)
    for o in outcomes:
        if o.ok:
            assert o.ended_at < killed_at + 1.0  # finished as the engine died
            continue
        assert o.ended_at - killed_at < 1.0, o
        assert o.error == "engine_unavailable"
        FIGURES.setdefault("engine SIGKILL, offload off: failed request answered after the kill", []).append(o.ended_at - killed_at)
    assert all(after)


def test_worker_sigkill_mid_stream(broker, cloud_engine, tiny_model_dir, sockets, tmp_path, moved_log):
    """A cloud worker process is SIGKILLed while it holds requests (one computing, the others
    queued in its engine): the streams it had started end with an error event, every request
    that had not started is moved to the other worker within 2 s (its Will), and none waits on
    the dead worker for more than 3 s."""
    prefix = {"topic_prefix": "chaosworker"}
    config = tmp_path / "worker.toml"
    config.write_text('[fleet]\ntopic_prefix = "chaosworker"\n[cloud]\nmax_concurrent = 16\n')
    with Engine(tiny_model_dir, sockets / "slowcloud.sock", max_batch=1, delay_s=0.03) as slow, \
            Engine(tiny_model_dir, sockets / "local-w.sock") as local, \
            Gateway(proxy_config(local.socket_path), settings(broker.url, "gw-wkill", offload=FORCE_OFFLOAD, fleet=prefix)) as gw:
        log = tmp_path / "worker.log"
        doomed = worker_process(broker.url, slow.socket_path, log, "--config", str(config))
        try:
            wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) == 1, what="the doomed worker's presence")

            async def main():
                stop = asyncio.Event()
                async with aiohttp.ClientSession() as session:
                    started = asyncio.Event()
                    tasks = [asyncio.ensure_future(request(session, gw.url, chat(stream=i % 2 == 0, max_tokens=40), started))
                             for i in range(6)]
                    while gw.run(lambda: gw.services.offloader.in_flight) < 6:
                        await asyncio.sleep(0.01)
                    await started.wait()
                    # The survivor joins now, so that every request so far went to the doomed one.
                    survivor = Gateway(ProxyConfig(engine_socket=str(cloud_engine.socket_path)),
                                       settings(broker.url, role="cloud", fleet=prefix)).__enter__()
                    while gw.run(lambda: gw.services.offloader.workers_online) < 2:
                        await asyncio.sleep(0.01)
                    sampler = asyncio.ensure_future(sample_readiness(gw.url, stop))
                    killed_at = time.monotonic()
                    kill(doomed)
                    outcomes = await asyncio.gather(*tasks)
                    stop.set()
                    return killed_at, outcomes, survivor, await sampler

            killed_at, outcomes, survivor, samples = run(main())
            try:
                served = survivor.metric("edge_proxy_cloud_requests_total", outcome="served")
            finally:
                survivor.__exit__(None, None, None)
        finally:
            kill(doomed)
    started = [o for o in outcomes if not o.ok]
    assert all(o.first_token_at is not None and o.first_token_at < killed_at for o in started), started
    for o in started:
        assert o.error == "offload_interrupted" and o.ended_at - killed_at < 2.0
    moves = [(at - killed_at, source, target) for at, source, target in moved_log.moved]
    # (the readiness sampler's requests go to either worker, and are moved too when they were on the doomed one)
    assert len(moves) >= len(outcomes) - len(started) and served >= len(moves), (moves, served)
    for delay, source, target in moves:
        assert (source, target) == ("cloud", "cloud") and delay < 2.0
        FIGURES.setdefault("worker SIGKILL: unstarted request moved to another worker after the kill", []).append(delay)
    for o in started:
        FIGURES.setdefault("worker SIGKILL: started stream's error event after the kill", []).append(o.ended_at - killed_at)
    assert all(o.ok and o.served_by == "cloud" for o in outcomes if o not in started)
    assert all(samples), samples


def test_broker_restart_mid_load(mqtt_broker, tiny_model_dir, sockets):
    """The broker restarts under load: no request hangs (those in flight on the cloud are moved
    to the engine or end with an error event), the engine serves while it is away, and offload
    serves again within 3 s of its return (the worker's presence closes the cloud breaker)."""
    broker = mqtt_broker()
    with Engine(tiny_model_dir, sockets / "bcloud.sock", max_batch=4, delay_s=0.01) as cloud, \
            Engine(tiny_model_dir, sockets / "blocal.sock", max_batch=4) as local, \
            Gateway(ProxyConfig(engine_socket=str(cloud.socket_path)), default_backoff(settings(broker.url, role="cloud"))) as worker, \
            Gateway(proxy_config(local.socket_path), default_backoff(settings(broker.url, "gw-brk", offload=FORCE_OFFLOAD))) as gw:
        wait_for(lambda: gw.run(lambda: gw.services.offloader.workers_online) == 1, what="the worker's presence")

        async def main():
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(sample_readiness(gw.url, stop))
            async with aiohttp.ClientSession() as session:
                tasks = [asyncio.ensure_future(request(session, gw.url, chat(stream=i % 2 == 0, max_tokens=40)))
                         for i in range(6)]
                while gw.run(lambda: gw.services.offloader.in_flight) < 6:
                    await asyncio.sleep(0.01)
                stopped_at = time.monotonic()
                await asyncio.to_thread(broker.stop)
                outcomes = await asyncio.gather(*tasks)
                away = await request(session, gw.url, chat(False, 4))
                await asyncio.to_thread(broker.start)
                back_at = time.monotonic()
                while True:  # until an offload is served again
                    answer = await request(session, gw.url, chat(False, 4))
                    if answer.ok and answer.served_by == "cloud":
                        serving_after = time.monotonic() - back_at
                        stop.set()
                        return stopped_at, outcomes, away, serving_after, await sampler
                    assert time.monotonic() - back_at < 10, answer

        stopped_at, outcomes, away, serving_after, samples = run(main())
        assert worker.sidecar  # (it stayed up throughout)
    for o in outcomes:
        assert o.ok or (o.first_token_at is not None and o.error == "offload_interrupted"), o
        assert o.ended_at - stopped_at < 5.0
    assert away.ok and away.served_by == "local"
    assert serving_after < 3.0
    assert all(samples), samples
    FIGURES.setdefault("broker restart: offload serving again after the broker's return", []).append(serving_after)


def default_backoff(mqtt: MqttSettings) -> MqttSettings:
    """The settings with [mqtt]'s default reconnect backoff (the harness's is shorter)."""
    defaults = MqttConfig(url=mqtt.mqtt.url)
    return dataclasses.replace(mqtt, mqtt=msgspec.structs.replace(mqtt.mqtt, reconnect_min_s=defaults.reconnect_min_s,
                                                                  reconnect_max_s=defaults.reconnect_max_s))


def test_gateway_restart_with_overlap(broker, tiny_model_dir, sockets, tmp_path):
    """The old gateway is told to stop (SIGTERM) while it streams an answer and a new one with
    the same gateway id starts at once: the old one leaves the broker first (it never connects
    again), its stream still finishes, and the new one connects once and stays connected."""
    config = tmp_path / "gw.toml"
    config.write_text('[proxy]\nmodel_aliases = ["tiny"]\ngrace_s = 20\n')
    log = tmp_path / "old.log"
    with Engine(tiny_model_dir, sockets / "restart.sock", max_batch=2, delay_s=0.02) as engine:
        port = __import__("mqtt_harness").free_port()
        with open(log, "ab") as out:
            old = subprocess.Popen([sys.executable, "-m", "proxy.main", "--config", str(config), "--mqtt", broker.url,
                                    "--gateway-id", "gw-twice", "--engine-socket", str(engine.socket_path), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "EDGE_OFFLOAD_SECRET": OFFLOAD_SECRET})
        try:
            wait_for(lambda: b"connected to the broker" in log.read_bytes() and b"listening" in log.read_bytes(),
                     what="the old gateway")

            async def main():
                async with aiohttp.ClientSession() as session:
                    started = asyncio.Event()
                    stream = asyncio.ensure_future(request(session, f"http://127.0.0.1:{port}", chat(True, 120), started))
                    await started.wait()
                    old.send_signal(signal.SIGTERM)
                    while b"leaving the broker" not in log.read_bytes():
                        await asyncio.sleep(0.01)
                    new = Gateway(proxy_config(engine.socket_path), settings(broker.url, "gw-twice")).__enter__()
                    return await stream, new

            outcome, new = run(main())
            try:
                assert old.wait(30) == 0
                assert outcome.ok and outcome.finish_reason == "length", outcome
                assert log.read_bytes().count(b"connected to the broker") == 1
                assert new.services.client.connected and new.services.client.connects == 1
            finally:
                new.__exit__(None, None, None)
        finally:
            kill(old)


def test_worker_sigterm_finishes_what_it_serves_and_leaves(broker, tiny_model_dir, sockets, tmp_path):
    """A worker told to stop (SIGTERM) mid-stream says `draining` (gateways stop counting it),
    finishes the stream it serves, clears its presence and exits 0."""
    config = tmp_path / "worker.toml"
    config.write_text('[fleet]\ntopic_prefix = "chaosterm"\n')
    with Engine(tiny_model_dir, sockets / "termcloud.sock", max_batch=1, delay_s=0.02) as slow, \
            Engine(tiny_model_dir, sockets / "termlocal.sock") as local, \
            Gateway(proxy_config(local.socket_path), settings(broker.url, "gw-wterm", offload=FORCE_OFFLOAD,
                                                              fleet={"topic_prefix": "chaosterm"})) as gw:
        log = tmp_path / "worker.log"
        worker = worker_process(broker.url, slow.socket_path, log, "--config", str(config))
        try:
            offloader = gw.services.offloader
            wait_for(lambda: gw.run(lambda: offloader.workers_online) == 1, what="the worker's presence")

            async def main():
                async with aiohttp.ClientSession() as session:
                    started = asyncio.Event()
                    stream = asyncio.ensure_future(request(session, gw.url, chat(True, 60), started))
                    await started.wait()
                    worker.send_signal(signal.SIGTERM)
                    while gw.run(lambda: offloader.workers_online) != 0:  # draining
                        await asyncio.sleep(0.01)
                    draining = gw.run(lambda: list(offloader.workers.values()))
                    return await stream, draining

            outcome, draining = run(main())
            assert outcome.ok and outcome.served_by == "cloud" and outcome.finish_reason == "length", outcome
            assert draining == ["draining"]  # known, not counted: its requests are not moved
            assert worker.wait(30) == 0
            wait_for(lambda: gw.run(lambda: offloader.workers) == {}, what="the worker's presence cleared")
        finally:
            kill(worker)
