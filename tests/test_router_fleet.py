"""The sidecar in the fleet: `[fleet] enabled` starts the fleet agent on the same broker
connection as offload and the device front; a controller's push is applied live where it can be
(a rate limit takes effect on the running sidecar at once), reported, sent back in telemetry's
counters, and laid over the config file at the next start."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from engine_harness import Engine
from gateway_harness import Gateway, mqtt_config, post

from edgectl.cli import Controller
from proxy import main as proxy_main
from proxy.auth.keys import hash_key
from proxy.fleet import APPLIED, NEEDS_RESTART
from proxy.fleet.signing import generate_keypair, load_private_key
from proxy.mqtt import MqttClient

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="fl-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


def gateway_args(tmp_path: Path, engine: Engine, broker, proxy: str, fleet: str):
    """The sidecar's command line for a config file with these extra [proxy] and [fleet] lines."""
    path = tmp_path / "config.toml"
    path.write_text(f'[proxy]\nengine_socket = "{engine.socket_path}"\nmodel_aliases = ["tiny"]\n{proxy}\n'
                    f'[mqtt]\nurl = "{broker.url}"\nkeepalive_s = 5\nreconnect_min_s = 0.05\nreconnect_max_s = 0.3\n'
                    f'[fleet]\nenabled = true\nstate_dir = "{tmp_path / "state"}"\n{fleet}\n[devices]\nenabled = true\n')
    return proxy_main._parser().parse_args(["--config", str(path)])


def test_a_pushed_rate_limit_takes_effect_live_and_stays_after_a_restart(mosquitto, engine, tmp_path):
    generate_keypair(tmp_path / "ctl.key", tmp_path / "ctl.pub")  # signed: proxy.port may be pushed
    key = load_private_key(tmp_path / "ctl.key")
    args = gateway_args(tmp_path, engine, mosquitto, "", f'controller_public_key = "{tmp_path / "ctl.pub"}"\ngateway_id = "gw-fleet"\n'
                                                       'telemetry_period_s = 0.2')
    config, settings = proxy_main.load(args)
    assert settings.mqtt is not None and settings.fleet.enabled and config.rate_limit_requests_per_min == 0

    with Gateway(config, settings) as gw:
        assert gw.services.agent is not None and gw.services.client is gw.services.agent.client  # one connection
        assert [run(post(f"{gw.url}/v1/chat/completions", BODY))[0] for _ in range(3)] == [200] * 3

        async def push():
            async with Controller(mqtt_config(mosquitto.url)) as ctl:
                refused = await ctl.push({"devices": {"reply_prefix": "elsewhere"}}, gateway="gw-fleet", version=1, key=key)
                pushed = await ctl.push({"proxy": {"rate_limit_requests_per_min": 1, "port": 9999, "cache_ttl_s": 5},
                                         "offload": {"max_wait_s": 2.5, "breaker_failures": 7},
                                         "devices": {"default_max_tokens": 4, "rate_limit_requests_per_min": 10}},
                                        gateway="gw-fleet", version=2, key=key)
                return refused, pushed

        refused, pushed = run(push())
        assert not refused.ok and "reply_prefix" in json.dumps(refused.reports["gw-fleet"]["reasons"])
        report = pushed.reports["gw-fleet"]
        assert pushed.ok and report["results"] == {
            "proxy.rate_limit_requests_per_min": APPLIED, "proxy.port": NEEDS_RESTART, "proxy.cache_ttl_s": APPLIED,
            "offload.max_wait_s": APPLIED, "offload.breaker_failures": APPLIED,
            "devices.default_max_tokens": APPLIED, "devices.rate_limit_requests_per_min": APPLIED,
        }
        # Live: the next requests meet the new limit (one a minute).
        statuses = [run(post(f"{gw.url}/v1/chat/completions", BODY)) for _ in range(2)]
        assert [s for s, _, _ in statuses] == [200, 429] and int(statuses[1][1]["Retry-After"]) >= 1
        router, devices = gw.router, gw.services.devices
        assert (router.config.max_wait_s, router.local.failures, router.cloud.failures) == (2.5, 7, 7)
        assert (devices.config.default_max_tokens, devices.limiter.default.requests_per_min) == (4, 10)
        assert gw.sidecar.service.cache.ttl_s == 5

        async def telemetry():
            client = MqttClient(mqtt_config(mosquitto.url), "watcher")
            got: asyncio.Queue = asyncio.Queue()
            client.subscribe("edge/gw-fleet/telemetry", got.put_nowait, qos=1)
            await client.start()
            while True:  # the retained (older) samples come first
                sample = msgpack.unpackb((await asyncio.wait_for(got.get(), 20)).payload)
                if sample.get("proxy", {}).get("requests", 0) >= 5:
                    break
            await client.stop()
            return sample

        counters = run(telemetry())["proxy"]
        assert counters["requests"] >= 5 and counters["errors"] == 0 and set(counters["cache"]) == {"hits", "misses"}
        assert counters["routes"]["local"] >= 4 and counters["mqtt"]["connected"] is True
        assert counters["breakers"] == {"local": "closed", "cloud": "closed"} and "offload" in counters

    # The next start: the pushed keys, "needs restart" ones included, are in force.
    config, settings = proxy_main.load(args)
    assert (config.rate_limit_requests_per_min, config.port, config.cache_ttl_s) == (1, 9999, 5)
    assert (settings.offload.max_wait_s, settings.devices.default_max_tokens) == (2.5, 4)


async def attacker_push(url: str, gateway: str, doc: dict) -> dict:
    """The attacker's side: a plain client that may publish to the broker sends `doc` (retained,
    unsigned) to the gateway's desired topic and reads the gateway's report on it."""
    client = MqttClient(mqtt_config(url), "attacker")
    reports: asyncio.Queue = asyncio.Queue()
    client.subscribe(f"edge/{gateway}/config/reported", reports.put_nowait, qos=1)
    await client.start()
    try:
        await client.publish(f"edge/{gateway}/config/desired", json.dumps(doc).encode(), qos=1, retain=True)
        while True:
            report = json.loads((await asyncio.wait_for(reports.get(), 20)).payload)
            if report.get("version") == doc["version"]:
                return report
    finally:
        await client.stop()


def test_an_attacker_cannot_push_api_keys_nor_pin_the_version_of_a_lab_gateway(mosquitto, engine, tmp_path):
    """The weakest setting (allow_unsigned, no controller key): an unsigned push of the
    attacker's key hash (with a tiny rate limit) is refused whole, the old key still works, at
    once and after a restart; a push pinning the version at 2^53-1 is refused, and the
    controller's next push is applied."""
    args = gateway_args(tmp_path, engine, mosquitto, f'api_keys = ["{hash_key("sk-old")}"]',
                        'allow_unsigned = true\ngateway_id = "gw-lab"\ntelemetry_period_s = 0')
    old, evil = {"Authorization": "Bearer sk-old"}, {"Authorization": "Bearer sk-evil"}
    now_ms = int(time.time() * 1000)
    with Gateway(*proxy_main.load(args)) as gw:
        report = run(attacker_push(mosquitto.url, "gw-lab", {
            "version": now_ms, "target": "gw-lab",
            "config": {"proxy": {"api_keys": [hash_key("sk-evil")], "rate_limit_requests_per_min": 2}}}))
        assert report["status"] == "rejected" and report["signed"] is False and report["allow_unsigned"] is True
        assert report["reasons"] == {"proxy.api_keys": "decides who may call the gateway: settable only in a document signed by the controller"}
        assert [run(post(f"{gw.url}/v1/chat/completions", BODY, headers=old))[0] for _ in range(3)] == [200] * 3  # no 429 either
        assert run(post(f"{gw.url}/v1/chat/completions", BODY, headers=evil))[0] == 401

        pinned = run(attacker_push(mosquitto.url, "gw-lab", {"version": 9007199254740991, "target": "gw-lab",
                                                             "config": {"proxy": {"cache_ttl_s": 1}}}))
        assert pinned["status"] == "rejected" and "ahead of this gateway's clock" in pinned["reasons"]["version"]
        reset = run(attacker_push(mosquitto.url, "gw-lab", {"version": now_ms + 1, "target": "gw-lab", "reset": True,
                                                            "issued_at": time.time(), "config": {}}))
        assert reset["reasons"] == {"reset": "a version reset must be signed by the controller"}

        async def controller():
            async with Controller(mqtt_config(mosquitto.url)) as ctl:
                return await ctl.push({"proxy": {"cache_ttl_s": 7}}, gateway="gw-lab")

        assert run(controller()).ok and gw.sidecar.service.cache.ttl_s == 7
    config, _ = proxy_main.load(args)  # the next start
    assert config.api_keys == (hash_key("sk-old"),) and config.rate_limit_requests_per_min == 0


def test_flags_give_a_gateway_its_broker_and_id_without_a_file(mosquitto):
    args = proxy_main._parser().parse_args(["--mqtt", mosquitto.url, "--gateway-id", "gw-flag"])
    _, settings = proxy_main.load(args)
    assert settings.mqtt.url == mosquitto.url and settings.gateway_id == "gw-flag" and not settings.fleet.enabled
    assert settings.topics.infer_request(settings.gateway_id) == "edge/gw-flag/infer/request"
    plain = proxy_main.load(proxy_main._parser().parse_args([]))[1]
    assert plain.mqtt is None  # no broker named: the plain HTTP gateway
    for argv, needle in ((["--mqtt", "http://x"], "--mqtt: url: scheme"), (["--gateway-id", "a/b"], "--gateway-id"),
                         (["--role", "cloud", "--upstream", "ftp://x"], "--upstream")):
        with pytest.raises(Exception) as exc:
            proxy_main.load(proxy_main._parser().parse_args(argv))
        assert needle in str(exc.value)
    assert proxy_main.main(["--mqtt", "mqtt://h:99999"]) == 2
