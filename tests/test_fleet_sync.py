"""Config sync end to end against a real Mosquitto: edgectl's Controller pushes, a FleetAgent
validates, applies (through the sidecar's hook), persists and reports."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgectl.cli import Controller
from proxy.fleet import APPLIED, NEEDS_RESTART, FleetAgent, FleetConfig, applied_config, default_tables
from proxy.fleet.document import make_desired
from proxy.fleet.signing import generate_keypair, load_private_key, sign
from proxy.mqtt import MqttConfig

TIMEOUT_S = 60.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def mqtt(url: str) -> MqttConfig:
    return MqttConfig(url=url, keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.5)


class Sidecar:
    """Stands in for the sidecar's on_apply: rate limits and cache sizes live, the rest later."""

    LIVE = {"proxy.rate_limit_requests_per_min", "proxy.cache_ttl_s", "proxy.log_level"}

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def on_apply(self, changes: dict) -> dict[str, str]:
        self.calls.append(changes)
        return {k: APPLIED if k in self.LIVE else NEEDS_RESTART for k in changes}


def agent_for(broker, tmp_path: Path, gateway_id: str = "gw-1", **fleet) -> tuple[FleetAgent, Sidecar]:
    """Without a controller key, a lab gateway (allow_unsigned)."""
    fleet.setdefault("allow_unsigned", "controller_public_key" not in fleet)
    config = tmp_path / "config.toml"
    config.write_text(f'[proxy]\nport = 8080\n[fleet]\ngateway_id = "{gateway_id}"\n')
    fleet_config = FleetConfig(gateway_id=gateway_id, state_dir=str(tmp_path / f"state-{gateway_id}"), telemetry_period_s=0, **fleet)
    sidecar = Sidecar()
    return FleetAgent(fleet_config, mqtt(broker.url), tables=default_tables(config), on_apply=sidecar.on_apply), sidecar


def controller_key(tmp_path: Path) -> tuple[Ed25519PrivateKey, str]:
    """A controller key pair: the private key, and the public key's file for [fleet]."""
    generate_keypair(tmp_path / "ctl.key", tmp_path / "ctl.pub")
    return load_private_key(tmp_path / "ctl.key"), str(tmp_path / "ctl.pub")


def test_push_is_applied_persisted_and_reported_and_bad_ones_are_refused(mosquitto, tmp_path):
    key, public = controller_key(tmp_path)  # signed: proxy.port may be pushed
    agent, sidecar = agent_for(mosquitto, tmp_path, controller_public_key=public)

    async def main():
        await agent.start()
        async with Controller(mqtt(mosquitto.url)) as ctl:
            good = {"proxy": {"rate_limit_requests_per_min": 120, "port": 9000}, "fleet": {"telemetry_period_s": 0.5}}
            result = await ctl.push(good, gateway="gw-1", version=5, key=key)
            report = result.reports["gw-1"]
            assert result.ok and report["status"] == "applied" and report["applied"] == {"gw-1": 5}
            assert report["results"] == {"proxy.rate_limit_requests_per_min": APPLIED, "proxy.port": NEEDS_RESTART,
                                         "fleet.telemetry_period_s": APPLIED}
            assert report["needs_restart"] == ["proxy.port"]
            assert sidecar.calls == [{"proxy.rate_limit_requests_per_min": 120, "proxy.port": 9000}]
            assert agent.telemetry.period_s == 0.5  # the agent's own live key
            assert applied_config(agent.fleet) == good  # on disk, for the next start

            bad = {"proxy": {"rate_limit_requests_per_min": -1, "port": "http", "colour": "red"},
                   "fleet": {"gateway_id": "someone-else"}, "mqtt": {"url": "mqtt://elsewhere"}}
            result = await ctl.push(bad, gateway="gw-1", version=6, key=key)
            report = result.reports["gw-1"]
            assert not result.ok and report["status"] == "rejected"
            assert report["reasons"] == {
                "proxy.rate_limit_requests_per_min": "must be >= 0, got -1",
                "proxy.port": "must be an integer, got 'http'",
                "proxy.colour": "unknown key",
                "fleet.gateway_id": "the gateway's identity is set locally",
                "mqtt": "broker settings are set locally (a wrong push would cut the gateway off)",
            }
            assert report["applied"] == {"gw-1": 5}  # the old one is kept ...
            assert len(sidecar.calls) == 1  # ... nothing was applied ...
            assert applied_config(agent.fleet) == good  # ... nor written

            replay = await ctl.push({"proxy": {"rate_limit_requests_per_min": 1}}, gateway="gw-1", version=5, key=key)
            assert replay.reports["gw-1"]["reasons"] == {"version": "5 is not newer than the applied version 5 (replayed or out of date)"}

            # the next one leaves port out: it goes back to the file's value, which needs a restart no more
            result = await ctl.push({"proxy": {"rate_limit_requests_per_min": 60}}, gateway="gw-1", version=7, key=key)
            report = result.reports["gw-1"]
            assert report["status"] == "applied" and report["needs_restart"] == []
            assert sidecar.calls[-1] == {"proxy.rate_limit_requests_per_min": 60, "proxy.port": 8080}
            assert report["results"]["fleet.telemetry_period_s"] == APPLIED and agent.telemetry.period_s == 0
            shown = await ctl.retained(ctl.topics.reported("gw-1"))
            assert shown == report
        await agent.stop()

    run(main())
    state = json.loads((tmp_path / "state-gw-1" / "config-state.json").read_text())
    assert state["layers"]["gw-1"]["version"] == 7


def test_group_and_gateway_layers(mosquitto, tmp_path):
    a, _ = agent_for(mosquitto, tmp_path, "gw-a", groups=("site",))
    b, _ = agent_for(mosquitto, tmp_path, "gw-b", groups=("site",))
    c, _ = agent_for(mosquitto, tmp_path, "gw-c")

    async def main():
        for agent in (a, b, c):
            await agent.start()
        for agent in (a, b, c):
            assert await agent.client.wait_connected(10)
        async with Controller(mqtt(mosquitto.url)) as ctl:
            own = await ctl.push({"proxy": {"cache_ttl_s": 5, "rate_limit_requests_per_min": 10}}, gateway="gw-a")
            assert own.ok
            group = await ctl.push({"proxy": {"cache_ttl_s": 60}}, group="site")
            assert group.ok and sorted(group.reports) == ["gw-a", "gw-b"] and group.target == "group:site"
            # gw-a's own document sits above the group's: its cache_ttl_s stays 5
            assert a.sync.config == {"proxy": {"cache_ttl_s": 5, "rate_limit_requests_per_min": 10}}
            assert b.sync.config == {"proxy": {"cache_ttl_s": 60}}
            assert c.sync.config == {}
            assert group.reports["gw-a"]["applied"] == {"group:site": group.version, "gw-a": own.version}
            gateways = await ctl.gateways()
            assert sorted(gateways) == ["gw-a", "gw-b", "gw-c"]
            assert gateways["gw-a"].status["state"] == "online" and gateways["gw-a"].status["groups"] == ["site"]
        for agent in (a, b, c):
            await agent.stop()

    run(main())


def test_signatures_are_required_with_a_controller_key(mosquitto, tmp_path):
    key, public = controller_key(tmp_path)
    generate_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    rogue = load_private_key(tmp_path / "rogue.key")
    agent, sidecar = agent_for(mosquitto, tmp_path, controller_public_key=public)
    config = {"proxy": {"rate_limit_requests_per_min": 30}}

    async def main():
        await agent.start()
        async with Controller(mqtt(mosquitto.url)) as ctl:
            unsigned = await ctl.push(config, gateway="gw-1", version=1)
            assert unsigned.reports["gw-1"]["reasons"] == {"signature": "missing (a signed document is required)"}
            forged = await ctl.push(config, gateway="gw-1", version=2, key=rogue)
            assert forged.reports["gw-1"]["reasons"] == {"signature": "does not verify with the controller's public key"}
            signed = await ctl.push(config, gateway="gw-1", version=3, key=key)
            assert signed.ok
            # a signed document altered on the way (a bigger limit), published straight to the topic
            waiting = asyncio.get_running_loop().create_future()
            ctl.client.subscribe(ctl.topics.reported("gw-1"), lambda m: waiting.done() or (
                json.loads(m.payload)["version"] == 4 and waiting.set_result(json.loads(m.payload))))
            doc = sign({"version": 4, "target": "gw-1", "config": config}, key)
            doc["config"] = {"proxy": {"rate_limit_requests_per_min": 100000}}
            await ctl.client.publish(ctl.topics.desired("gw-1"), json.dumps(doc), qos=1, retain=True)
            tampered = await asyncio.wait_for(waiting, 20)
            assert tampered["status"] == "rejected" and "signature" in tampered["reasons"]
            assert tampered["applied"] == {"gw-1": 3}
        await agent.stop()
        assert sidecar.calls == [{"proxy.rate_limit_requests_per_min": 30}]

    run(main())


async def publish_and_report(ctl: Controller, doc: dict) -> dict:
    """Publish `doc` as it is (retained) on its target's desired topic; the gateway's report on it."""
    waiting = asyncio.get_running_loop().create_future()

    def on_report(message) -> None:
        report = json.loads(message.payload)
        if not waiting.done() and report["version"] == doc["version"] and report["ts"] >= sent:
            waiting.set_result(report)

    ctl.client.subscribe(ctl.topics.reported(doc["target"]), on_report)
    sent = round(time.time(), 3) - 0.001
    await ctl.client.publish(ctl.topics.desired(doc["target"]), json.dumps(doc), qos=1, retain=True)
    try:
        return await asyncio.wait_for(waiting, 20)
    finally:
        ctl.client.unsubscribe(ctl.topics.reported(doc["target"]), on_report)


def test_signed_only_keys_need_the_controllers_signature(mosquitto, tmp_path, caplog):
    """A gateway with a controller key that also allows unsigned pushes (a lab in transition):
    api_keys is set by a signed push only; an unsigned one can neither set it nor, by leaving it
    out, put the file's value back; the other keys of an unsigned push still apply."""
    key, public = controller_key(tmp_path)
    agent, sidecar = agent_for(mosquitto, tmp_path, controller_public_key=public, allow_unsigned=True)
    evil, rotated = "e" * 64, "b" * 64

    async def main():
        await agent.start()
        async with Controller(mqtt(mosquitto.url)) as ctl:
            unsigned = await ctl.push({"proxy": {"api_keys": [evil], "host": "0.0.0.0", "cache_ttl_s": 9}}, gateway="gw-1", version=1)
            assert unsigned.reports["gw-1"]["reasons"] == {
                "proxy.api_keys": "decides who may call the gateway: settable only in a document signed by the controller",
                "proxy.host": "decides where the gateway listens or what it talks to: settable only in a document signed by the controller"}
            signed = await ctl.push({"proxy": {"api_keys": [rotated]}}, gateway="gw-1", version=2, key=key)
            assert signed.ok and signed.reports["gw-1"]["signed"] is True
            dropping = await ctl.push({"proxy": {"cache_ttl_s": 9}}, gateway="gw-1", version=3)  # api_keys left out
            assert dropping.reports["gw-1"]["reasons"] == {
                "proxy.api_keys": "decides who may call the gateway: settable only in a document signed by the controller"}
            assert (await ctl.push({"proxy": {"api_keys": [rotated], "cache_ttl_s": 9}}, gateway="gw-1", version=4, key=key)).ok
        await agent.stop()
        assert agent.sync.config == {"proxy": {"api_keys": [rotated], "cache_ttl_s": 9}}
        assert [c for c in sidecar.calls if "proxy.api_keys" in c] == [{"proxy.api_keys": [rotated]}]
        assert any(r.levelname == "WARNING" and "accepts unsigned desired config" in r.getMessage() for r in caplog.records)
        assert evil not in caplog.text and rotated not in caplog.text  # key hashes are not logged

    run(main())


def test_a_pinned_version_is_bounded_and_reset_by_a_signed_reset(mosquitto, tmp_path, capsys):
    """Versions are issue times: one far ahead of the gateway's clock is refused even signed;
    one within the skew (a controller with a fast clock) blocks ordinary pushes only until
    `edgectl reset-version`, which must be signed and cannot be replayed."""
    from edgectl.cli import main as edgectl

    key, public = controller_key(tmp_path)
    agent, _ = agent_for(mosquitto, tmp_path, controller_public_key=public, max_clock_skew_s=300)
    (tmp_path / "reset.toml").write_text("[proxy]\ncache_ttl_s = 42\n")
    now_ms = int(time.time() * 1000)

    async def main():
        await agent.start()
        assert await agent.client.wait_connected(10)
        async with Controller(mqtt(mosquitto.url)) as ctl:
            far = await ctl.push({"proxy": {"cache_ttl_s": 1}}, gateway="gw-1", version=9007199254740991, key=key)
            assert "ahead of this gateway's clock" in far.reports["gw-1"]["reasons"]["version"]
            ahead = await ctl.push({"proxy": {"cache_ttl_s": 2}}, gateway="gw-1", version=now_ms + 200_000, key=key)
            assert ahead.ok
            stuck = await ctl.push({"proxy": {"cache_ttl_s": 3}}, gateway="gw-1", version=now_ms + 1000, key=key)
            assert "not newer" in stuck.reports["gw-1"]["reasons"]["version"]
            unsigned_reset = await publish_and_report(ctl, {**make_desired("gw-1", now_ms, {}, reset=True)})
            assert unsigned_reset["reasons"] == {"signature": "missing (a signed document is required)"}
            stale = sign(make_desired("gw-1", now_ms, {}, reset=True), key)
            stale["issued_at"] -= 3600
            stale = sign(stale, key)
            assert "within max_clock_skew_s" in (await publish_and_report(ctl, stale))["reasons"]["issued_at"]

            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, edgectl, ["--broker", mosquitto.url, "reset-version", "gw-1", str(tmp_path / "reset.toml"),
                                                              "--sign-key", str(tmp_path / "ctl.key")])
            assert code == 0 and agent.sync.config == {"proxy": {"cache_ttl_s": 42}}
            reset_doc = await ctl.retained(ctl.topics.desired("gw-1"))
            assert reset_doc["reset"] is True and reset_doc["version"] < now_ms + 200_000
            normal = await ctl.push({"proxy": {"cache_ttl_s": 4}}, gateway="gw-1", key=key)  # ordinary pushes work again
            assert normal.ok and agent.sync.config == {"proxy": {"cache_ttl_s": 4}}
            replayed = await publish_and_report(ctl, reset_doc)  # the reset, captured and sent again
            assert "not after the last reset" in replayed["reasons"]["issued_at"]
            assert agent.sync.config == {"proxy": {"cache_ttl_s": 4}}
        await agent.stop()

    run(main())
    assert "pushed version" in capsys.readouterr().out


def test_a_10_mb_desired_document_never_reaches_the_gateway(mosquitto, tmp_path):
    """The attacker's 10 MB document on the desired topic is dropped by the broker (the
    gateway's MaximumPacketSize): the gateway never reads it, so never reports on it (it would
    report it over the size limit); the document after it is read and reported."""
    agent, _ = agent_for(mosquitto, tmp_path)
    reports: list[dict] = []

    async def main():
        await agent.start()
        assert await agent.client.wait_connected(10)
        async with Controller(mqtt(mosquitto.url)) as ctl:
            ctl.client.subscribe(ctl.topics.reported("gw-1"), lambda m: reports.append(json.loads(m.payload)))
            huge = json.dumps({"version": 1, "target": "gw-1", "config": {}, "issued_by": "x" * (10 << 20)}).encode()
            await ctl.client.publish(ctl.topics.desired("gw-1"), huge, qos=1)
            after = await publish_and_report(ctl, make_desired("gw-1", 2, {"proxy": {"cache_ttl_s": 5}}))
            assert after["status"] == "applied"
        await agent.stop()

    run(main())
    assert [r["version"] for r in reports] == [2]


def test_an_old_document_replayed_verbatim_is_refused(mosquitto, tmp_path):
    agent, sidecar = agent_for(mosquitto, tmp_path)
    captured: list[bytes] = []

    async def main():
        await agent.start()
        async with Controller(mqtt(mosquitto.url)) as ctl:
            ctl.client.subscribe(ctl.topics.desired("gw-1"), lambda m: captured.append(m.payload))
            assert (await ctl.push({"proxy": {"cache_ttl_s": 5}}, gateway="gw-1", version=10)).ok
            assert (await ctl.push({"proxy": {"cache_ttl_s": 50}}, gateway="gw-1", version=11)).ok
            old = next(p for p in captured if json.loads(p)["version"] == 10)
            waiting = asyncio.get_running_loop().create_future()
            ctl.client.subscribe(ctl.topics.reported("gw-1"), lambda m: waiting.done() or (
                json.loads(m.payload)["version"] == 10 and waiting.set_result(json.loads(m.payload))))
            await ctl.client.publish(ctl.topics.desired("gw-1"), old, qos=1, retain=True)
            report = await asyncio.wait_for(waiting, 20)
            assert report["status"] == "rejected" and report["applied"] == {"gw-1": 11}
        await agent.stop()
        assert agent.sync.config == {"proxy": {"cache_ttl_s": 50}}

    run(main())


@pytest.mark.parametrize("target", ["gw-1", "group:site"])
def test_edgectl_command_line(mosquitto, tmp_path, capsys, target):
    from edgectl.cli import main as edgectl

    agent, _ = agent_for(mosquitto, tmp_path, groups=("site",))
    (tmp_path / "push.toml").write_text("[proxy]\nrate_limit_requests_per_min = 90\n")
    (tmp_path / "bad.json").write_text('{"proxy": {"rate_limit_requests_per_min": -5}}')
    results: dict[str, int] = {}

    async def main():
        await agent.start()
        assert await agent.client.wait_connected(10)
        loop = asyncio.get_running_loop()
        for name, args in [
            ("push", ["push", target, str(tmp_path / "push.toml"), "--version", "3"]),
            ("bad", ["push", target, str(tmp_path / "bad.json"), "--version", "4"]),
            ("list", ["list"]),
            ("show", ["show", "gw-1"]),
        ]:  # edgectl runs its own event loop: in a thread here, beside the agent's
            results[name] = await loop.run_in_executor(None, edgectl, ["--broker", mosquitto.url, *args])
        await agent.stop()

    run(main())
    out = capsys.readouterr().out
    assert results == {"push": 0, "bad": 1, "list": 0, "show": 0}
    assert f"pushed version 3 to {target}" in out and "proxy.rate_limit_requests_per_min: applied" in out.replace("needs_restart", "applied")
    assert "proxy.rate_limit_requests_per_min: must be >= 0, got -5" in out
    assert "gw-1" in out.split("GATEWAY", 1)[1] and "online UNSIGNED-CONFIG-ALLOWED" in out  # a lab gateway, shown as such


def test_edgectl_global_options_go_anywhere_on_the_line(mosquitto, tmp_path, capsys):
    """`edgectl list --broker URL` as well as `edgectl --broker URL list`; a value after the
    command's name wins over one before it."""
    from edgectl.cli import EXIT_NO_REPORT, _parser
    from edgectl.cli import main as edgectl

    agent, _ = agent_for(mosquitto, tmp_path)
    results: list[int] = []

    async def main():
        await agent.start()
        assert await agent.client.wait_connected(10)
        loop = asyncio.get_running_loop()
        for args in (["list", "--json", "--broker", mosquitto.url],
                     ["--broker", "mqtt://nowhere.invalid:1", "list", "--broker", mosquitto.url, "--prefix", "edge", "--json"],
                     ["show", "gw-1", "--broker", mosquitto.url]):
            results.append(await loop.run_in_executor(None, edgectl, args))
        await agent.stop()

    run(main())
    out = capsys.readouterr().out
    assert results == [0, 0, EXIT_NO_REPORT]  # show: the broker reached, nothing pushed to gw-1 yet
    listed = [json.loads(line)["gateway"] for line in out.splitlines() if line.startswith('{"gateway"')]
    assert listed == ["gw-1", "gw-1"]
    args = _parser().parse_args(["--prefix", "site", "--config", "a.toml", "watch", "--allow-plaintext"])
    assert (args.prefix, args.config, args.allow_plaintext, args.broker) == ("site", Path("a.toml"), True, None)


def test_edgectl_keygen_and_usage_errors(tmp_path, capsys, monkeypatch):
    from edgectl.cli import main as edgectl

    monkeypatch.chdir(tmp_path)
    assert edgectl(["keygen", "ops"]) == 0
    assert (tmp_path / "ops.key").exists() and (tmp_path / "ops.pub").exists()
    assert edgectl(["keygen", "ops"]) == 2  # never overwrites
    assert edgectl(["--broker", "http://x", "list"]) == 2
    assert edgectl(["push", "bad/name", "x.toml"]) == 2
    assert edgectl(["--broker", "mqtt://broker.example.net", "list"]) == 2  # no TLS off loopback, not allowed
    err = capsys.readouterr().err
    assert "ops.key exists" in err and "url: scheme must be" in err and "gateway: must be 1 to 64" in err
    assert "mqtt://broker.example.net is not encrypted" in err and "allow_plaintext = true" in err
    # allowed: the URL passes, and the command stops at the next thing (the file, read before connecting)
    assert edgectl(["--broker", "mqtt://broker.example.net", "--allow-plaintext", "push", "gw-1", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert "none.toml: cannot read" in err and "not encrypted" not in err


def test_a_restarted_gateway_keeps_its_pushed_config_and_does_not_redo_it(mosquitto, tmp_path):
    agent, sidecar = agent_for(mosquitto, tmp_path)

    async def main():
        nonlocal agent, sidecar
        await agent.start()
        async with Controller(mqtt(mosquitto.url)) as ctl:
            pushed = await ctl.push({"fleet": {"telemetry_buffer_bytes": 65536}, "proxy": {"cache_ttl_s": 30}}, gateway="gw-1", version=1)
            assert pushed.reports["gw-1"]["needs_restart"] == ["fleet.telemetry_buffer_bytes"]
            assert agent.telemetry.buffer.max_bytes == 4 << 20
            await agent.stop()

            agent, sidecar = agent_for(mosquitto, tmp_path)  # the same state directory: a restart
            reports = []
            ctl.client.subscribe(ctl.topics.reported("gw-1"), lambda m: reports.append(json.loads(m.payload)))
            await agent.start()
            assert await agent.client.wait_connected(10)
            async with asyncio.timeout(20):
                while len(reports) < 2:  # the retained report, then the one re-published on connect
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # time enough to (wrongly) apply the retained desired config again
            assert agent.telemetry.buffer.max_bytes == 65536  # in force from the start
            assert agent.config_versions == {"gw-1": 1} and sidecar.calls == []  # not applied twice
            assert reports and all(r["boot"] == 1 for r in reports)  # only the old report, re-published ...
            assert reports[-1]["needs_restart"] == []  # ... saying that the restart happened
        await agent.stop()

    run(main())
