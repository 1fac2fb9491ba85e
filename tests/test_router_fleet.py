"""The sidecar in the fleet: `[fleet] enabled` starts the fleet agent on the same broker
connection as offload and the device front; a controller's push is applied live where it can be
(a rate limit takes effect on the running sidecar at once), reported, sent back in telemetry's
counters, and laid over the config file at the next start."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import msgpack
import pytest
from engine_harness import Engine
from gateway_harness import Gateway, mqtt_config, post

from edgectl.cli import Controller
from proxy import main as proxy_main
from proxy.fleet import APPLIED, NEEDS_RESTART
from proxy.mqtt import MqttClient

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="fl-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


def test_a_pushed_rate_limit_takes_effect_live_and_stays_after_a_restart(mosquitto, engine, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[proxy]\nengine_socket = "{engine.socket_path}"\nmodel_aliases = ["tiny"]\n'
                    f'[mqtt]\nurl = "{mosquitto.url}"\nkeepalive_s = 5\nreconnect_min_s = 0.05\nreconnect_max_s = 0.3\n'
                    f'[fleet]\nenabled = true\ngateway_id = "gw-fleet"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'telemetry_period_s = 0.2\n[devices]\nenabled = true\n')
    args = proxy_main._parser().parse_args(["--config", str(path)])
    config, settings = proxy_main.load(args)
    assert settings.mqtt is not None and settings.fleet.enabled and config.rate_limit_requests_per_min == 0

    with Gateway(config, settings) as gw:
        assert gw.services.agent is not None and gw.services.client is gw.services.agent.client  # one connection
        assert [run(post(f"{gw.url}/v1/chat/completions", BODY))[0] for _ in range(3)] == [200] * 3

        async def push():
            async with Controller(mqtt_config(mosquitto.url)) as ctl:
                refused = await ctl.push({"devices": {"reply_prefix": "elsewhere"}}, gateway="gw-fleet", version=1)
                pushed = await ctl.push({"proxy": {"rate_limit_requests_per_min": 1, "port": 9999, "cache_ttl_s": 5},
                                         "offload": {"max_wait_s": 2.5, "breaker_failures": 7},
                                         "devices": {"default_max_tokens": 4, "rate_limit_requests_per_min": 10}},
                                        gateway="gw-fleet", version=2)
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
