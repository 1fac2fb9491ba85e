"""The fleet console's parts without a browser: the history store (bounds, buckets, push
history), telemetry -> chart points, health flags, access rules and the JSON API against a real
Mosquitto (telemetry, status and reports published as gateways publish them)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from edge_wire.settings import ConfigError
from edgectl.console.auth import CSRF_HEADER, SESSION_COOKIE, Access
from edgectl.console.config import ConsoleConfig
from edgectl.console.health import flags
from edgectl.console.metrics import point
from edgectl.console.server import build_app
from edgectl.console.store import HistoryStore
from proxy.auth.keys import hash_key
from proxy.fleet.signing import generate_keypair
from proxy.mqtt import MqttClient, MqttConfig

# -- store ---------------------------------------------------------------------------------------


def test_store_series_since_and_buckets():
    store = HistoryStore(None, max_age_s=3600, max_bytes=1 << 20)
    for i in range(10):
        store.add_point("gw", 100.0 + i, {"cpu": float(i), "requests": 2, "offload": {"busy": 1}})
    store.add_point("other", 105.0, {"cpu": 99.0})
    store.flush()
    assert [p["ts"] for p in store.series("gw", 104.0, 200.0)] == [105.0, 106.0, 107.0, 108.0, 109.0]
    merged = store.series("gw", 0, 200.0, max_points=2)
    assert len(merged) == 2
    assert merged[0]["cpu"] == 2.0 and merged[0]["requests"] == 10 and merged[0]["offload"] == {"busy": 5}  # means; sums for counts
    assert sum(p["requests"] for p in merged) == 20


def test_store_drops_by_age_and_by_size(tmp_path):
    store = HistoryStore(str(tmp_path / "h.sqlite3"), max_age_s=60, max_bytes=1 << 20)
    now = time.time()
    store.add_point("gw", now - 120, {"cpu": 1})
    store.add_point("gw", now - 10, {"cpu": 2})
    store.flush()
    assert store.prune(now) == 1
    assert [p["cpu"] for p in store.series("gw", 0)] == [2]
    big = {"cpu": 1.0, "pad": "x" * 200}
    for i in range(20_000):  # ~5 MB of points, 1 MB allowed
        store.add_point("gw", now - 5 + i * 1e-4, big)
    store.flush()
    assert store.used_bytes() > 1 << 20
    dropped = store.prune(now)
    assert dropped > 0 and store.used_bytes() <= 1 << 20
    newest = store.series("gw", 0)[-1]["ts"]
    assert newest == pytest.approx(now - 5 + 19_999 * 1e-4)  # the oldest went, the newest stayed
    assert (tmp_path / "h.sqlite3").stat().st_size < 3 << 20  # freed pages went back to the file system
    store.close()


def test_store_push_history_keeps_the_first_sighting_and_joins_reports():
    store = HistoryStore(None, max_age_s=3600, max_bytes=1 << 20)
    doc = {"version": 5, "target": "gw-1", "config": {"proxy": {"port": 1}}, "issued_at": 10.0, "issued_by": "ops", "signature": "x"}
    store.record_push(doc)
    store.record_push({**doc, "issued_by": "someone-else"})  # the retained copy again
    store.record_push({"version": 2, "target": "group:lab", "config": {}, "issued_at": 5.0})
    store.record_report("gw-1", {"target": "gw-1", "version": 5, "status": "rejected", "reasons": {"proxy.port": "no"}, "ts": 11.0})
    store.record_report("gw-1", {"target": None, "version": None, "status": "rejected"})  # unreadable document: not history
    rows = store.pushes(["gw-1", "group:lab"], "gw-1")
    assert [(r["target"], r["version"], r["issued_by"], r["signed"]) for r in rows] == [("gw-1", 5, "ops", True), ("group:lab", 2, None, False)]
    assert rows[0]["report"] == {"status": "rejected", "reasons": {"proxy.port": "no"}, "results": {}, "ts": 11.0}
    assert rows[1]["report"] is None


# -- points and flags ------------------------------------------------------------------------------


def telemetry(boot: int = 1, **proxy) -> dict:
    return {"boot": boot, "ts": 1.0, "host": {"cpu_percent": 12.5, "mem_percent": 40.0, "temps_c": {"cpu/0": 55.0}},
            "gpus": [{"util_percent": 30, "temp_c": 70}], "engine": {"up": True, "tokens_per_s": 20.0, "queue_depth": 2},
            "proxy": {"requests": 10, "errors": 1, "cache": {"hits": 1, "misses": 1}, "ttft_s": {"sum": 1.0, "count": 4},
                      "offload": {"busy": 1}, **proxy}, "fleet": {"buffered": 0, "dropped": 0}}


def test_points_take_differences_within_a_boot():
    first = telemetry()
    assert point(first, None) == {"cpu": 12.5, "mem": 40.0, "temp": 70, "gpu": 30, "tps": 20.0, "queue": 2}
    second = telemetry(requests=20, errors=1, cache={"hits": 4, "misses": 2}, ttft_s={"sum": 2.0, "count": 8}, offload={"busy": 4, "memory": 2})
    p = point(second, first)
    assert (p["requests"], p["errors"], p["cache_hit"], p["ttft_ms"], p["offload"]) == (10, 0, 75.0, 250.0, {"busy": 3, "memory": 2})
    assert "requests" not in point(telemetry(boot=2), first)  # a new boot: no difference with the last one
    assert point(telemetry(requests=3), first)["requests"] == 3  # a counter that went back: it restarted


def test_health_flags():
    config = ConsoleConfig(hot_c=65, memory_percent=40, offload_fraction=0.5)
    status = {"state": "online"}
    assert flags(status, None, telemetry(), [], config) == ["hot", "memory"]
    assert flags(None, {"status": "rejected"}, {"fleet": {"buffered": 3}}, [{"requests": 4, "offload": {"busy": 2}}], ConsoleConfig()) == \
        ["offline", "rejecting", "offloading", "buffered"]
    assert flags(status, {"status": "applied"}, {}, [{"requests": 4, "offload": {"busy": 1}}], ConsoleConfig()) == []


# -- access ----------------------------------------------------------------------------------------


def test_off_loopback_needs_credentials_and_tls():
    with pytest.raises(ConfigError, match="tokens: required when listening on 10.0.0.5"):
        ConsoleConfig(host="10.0.0.5")
    with pytest.raises(ConfigError, match="tls_cert: required"):
        ConsoleConfig(host="10.0.0.5", tokens=(hash_key("t"),))
    with pytest.raises(ConfigError, match="must be a sha256 hex digest") as info:
        ConsoleConfig(tokens=("plain-secret",))
    assert "plain-secret" not in str(info.value)  # never echoed
    assert ConsoleConfig(host="10.0.0.5", users={"ops": hash_key("pw")}, tls_cert="c", tls_key="k").loopback is False


def request(headers=None, remote="127.0.0.1", method="GET", host="127.0.0.1:8470"):
    req = make_mocked_request(method, "/api/v1/gateways", headers={"Host": host, **(headers or {})})
    return req.clone(remote=remote)


def test_access_rules():
    open_access = Access(ConsoleConfig())
    assert open_access.authenticate(request())[1] is False
    for bad in (request(remote="10.1.2.3"), request(host="console.example.com"), request(host="evil.example:8470")):
        with pytest.raises(web.HTTPForbidden):
            open_access.authenticate(bad)
    closed = Access(ConsoleConfig(tokens=(hash_key("tok"),), users={"ops": hash_key("pw")}))
    assert closed.authenticate(request({"Authorization": "Bearer tok"})) == (f"token:{hash_key('tok')[:8]}", True)
    assert closed.authenticate(request({"Authorization": "Basic " + base64.b64encode(b"ops:pw").decode()})) == ("ops", False)
    for header in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + base64.b64encode(b"ops:no").decode()},
                   {"Authorization": "Basic " + base64.b64encode(b"eve:pw").decode()}, {"Authorization": "Basic !!"}):
        with pytest.raises(web.HTTPUnauthorized) as info:
            closed.authenticate(request(header, remote="10.1.2.3"))
        assert info.value.headers["WWW-Authenticate"].startswith("Basic")
    # CSRF: the token of this session's cookie, from this origin
    token = open_access.csrf_token("s1")
    ok = {"Cookie": f"{SESSION_COOKIE}=s1", CSRF_HEADER: token, "Origin": "http://127.0.0.1:8470"}
    open_access.check_csrf(request(ok, method="POST"))
    for bad in ({**ok, CSRF_HEADER: open_access.csrf_token("s2")}, {**ok, "Origin": "http://evil.example"},
                {**ok, "Sec-Fetch-Site": "cross-site"}, {k: v for k, v in ok.items() if k != "Cookie"}):
        with pytest.raises(web.HTTPForbidden):
            open_access.check_csrf(request(bad, method="POST"))


# -- the JSON API against a real broker ------------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def api_client(broker_url: str, **config) -> TestClient:
    app = build_app(ConsoleConfig(**config), MqttConfig(url=broker_url, keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.3))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def csrf(client: TestClient) -> dict[str, str]:
    session = await (await client.get("/api/v1/session")).json()
    return {session["csrf_header"]: session["csrf"]}


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


def test_api_overview_series_and_read_only(mosquitto):
    async def main():
        client = await api_client(mosquitto.url, hot_c=60)
        gateway = MqttClient(MqttConfig(url=mosquitto.url), "gw-t")
        await gateway.start()
        try:
            status = {"state": "online", "gateway": "gw-t", "boot": 3, "groups": ["lab"], "version": "9.9", "allow_unsigned": False, "ts": time.time()}
            await gateway.publish("edge/gw-t/status", json.dumps(status).encode(), qos=1, retain=True)
            for seq in (1, 2):
                tel = {**telemetry(boot=3), "ts": time.time(), "seq": seq, "gateway": "gw-t"}
                tel["engine"]["model"] = {"id": "smollm2-135m"}
                await gateway.publish("edge/gw-t/telemetry", msgpack.packb(tel), qos=1, retain=True)

            async def two_points():
                r = await client.get("/api/v1/gateways/gw-t/series?window=60")
                return r.status == 200 and len((await r.json())["points"]) == 2
            await until(two_points)
            body = await (await client.get("/api/v1/gateways")).json()
            row = body["gateways"][0]
            assert (row["id"], row["state"], row["boot"], row["version"], row["groups"], row["model"]) == ("gw-t", "online", 3, "9.9", ["lab"], "smollm2-135m")
            assert row["flags"] == ["hot"] and body["counts"]["online"] == 1 and body["counts"]["hot"] == 1
            assert row["config"] == {"group:lab": {"desired": None, "applied": None}, "gw-t": {"desired": None, "applied": None}}
            points = (await (await client.get("/api/v1/gateways/gw-t/series?window=60")).json())["points"]
            assert points[1]["requests"] == 0 and points[0]["cpu"] == 12.5

            assert (await client.get("/api/v1/gateways/nope")).status == 404
            bad = await client.get("/api/v1/gateways/gw-t/series?window=abc")
            assert bad.status == 400 and (await bad.json())["error"]["code"] == "bad_request"
            session = await (await client.get("/api/v1/session")).json()
            assert session["read_only"] is True and session["key_fingerprint"] is None
            headers = await csrf(client)
            r = await client.post("/api/v1/validate", json={"target": "gw-t", "toml": "[proxy]\napi_keys = []\n"}, headers=headers)
            reasons = (await r.json())["reasons"]  # unsigned (no key): signed-only keys are refused, as the gateway would
            assert list(reasons) == ["proxy.api_keys"] and "signed by the controller" in reasons["proxy.api_keys"]
            r = await client.post("/api/v1/validate", json={"target": "gw-t", "toml": "[proxy\n"}, headers=headers)
            assert r.status == 400 and (await r.json())["error"]["code"] == "bad_toml"
            r = await client.post("/api/v1/validate", json={"target": "no/slash", "toml": ""}, headers=headers)
            assert r.status == 400 and (await r.json())["error"]["code"] == "bad_target"
            r = await client.post("/api/v1/validate", json={"target": "gw-t", "toml": "[proxy]\nx = 1979-05-27\n"}, headers=headers)
            assert r.status == 400 and "JSON values" in (await r.json())["error"]["message"]
            r = await client.post("/api/v1/push", json={"target": "gw-t", "toml": "[proxy]\nport = 1\n"}, headers=headers)
            assert r.status == 403 and (await r.json())["error"]["code"] == "read_only"
        finally:
            await gateway.stop()
            await client.close()

    run(main())


def test_api_push_is_signed_and_recorded_with_who_issued_it(mosquitto, tmp_path):
    generate_keypair(tmp_path / "ctl.key", tmp_path / "ctl.pub")

    async def main():
        client = await api_client(mosquitto.url, key_file=str(tmp_path / "ctl.key"))
        gateway = MqttClient(MqttConfig(url=mosquitto.url), "gw-p")
        await gateway.start()
        try:
            await gateway.publish("edge/gw-p/status", json.dumps({"state": "online", "boot": 1, "groups": []}).encode(), qos=1, retain=True)

            async def known():
                return (await client.get("/api/v1/gateways/gw-p")).status == 200
            await until(known)
            headers = await csrf(client)
            invalid = {"target": "gw-p", "toml": "[proxy]\nrate_limit_requests_per_min = -1\n"}
            r = await client.post("/api/v1/push", json=invalid, headers=headers)
            body = await r.json()
            assert r.status == 400 and body["error"]["reasons"] == {"proxy.rate_limit_requests_per_min": "must be >= 0, got -1"}
            r = await client.post("/api/v1/push", json={"target": "gw-p", "toml": "[proxy]\nport = 9000\n"}, headers=headers)
            assert r.status == 202
            pushed = await r.json()

            async def recorded():
                rows = (await (await client.get("/api/v1/gateways/gw-p/pushes")).json())["pushes"]
                return rows and rows[0]["version"] == pushed["version"]
            await until(recorded)
            rows = (await (await client.get("/api/v1/gateways/gw-p/pushes")).json())["pushes"]
            assert rows[0]["signed"] is True and rows[0]["issued_by"] == pushed["issued_by"] and rows[0]["config"] == {"proxy": {"port": 9000}}
            detail = await (await client.get("/api/v1/gateways/gw-p")).json()
            assert detail["keys"] == [{"target": "gw-p", "version": pushed["version"], "key": "proxy.port", "value": 9000,
                                       "status": "pending", "reason": None}]  # no gateway agent here: nobody reported
            r = await client.post("/api/v1/push", json={"target": "gw-p", "toml": ""})  # no CSRF token
            assert r.status == 403
        finally:
            await gateway.stop()
            await client.close()

    run(main())


def test_malformed_payloads_on_the_broker_do_not_break_the_overview(mosquitto):
    async def main():
        client = await api_client(mosquitto.url)
        rogue = MqttClient(MqttConfig(url=mosquitto.url), "rogue")
        await rogue.start()
        try:
            await rogue.publish("edge/gw-x/status", json.dumps({"state": "online", "groups": "not-a-list", "boot": "?"}).encode(), qos=1, retain=True)
            await rogue.publish("edge/gw-x/telemetry", msgpack.packb({"ts": time.time(), "host": "x", "engine": [1], "fleet": 3, "proxy": "y", "gpus": 7, "jetson": [2],
                                                                 "process": {"cpu_percent": float("nan")}}),
                                qos=1, retain=True)
            await rogue.publish("edge/gw-x/config/reported", json.dumps({"status": 1, "applied": [], "needs_restart": 5, "reasons": "z"}).encode(),
                                qos=1, retain=True)
            await rogue.publish("edge/gw-y/telemetry", b"\xc1 not msgpack", qos=1, retain=True)
            await rogue.publish("edge/gw-x/config/desired", b'{"version": "x"}', qos=1, retain=True)

            async def seen():
                r = await client.get("/api/v1/gateways/gw-x")
                return r.status == 200 and (await r.json())["reported"] is not None and (await r.json())["telemetry"] is not None
            await until(seen)
            body = await (await client.get("/api/v1/gateways")).json()
            assert [g["id"] for g in body["gateways"]] == ["gw-x"] and body["gateways"][0]["groups"] == []
            detail = await client.get("/api/v1/gateways/gw-x")
            assert json.loads(await detail.text())["telemetry"]["process"] == {"cpu_percent": None}  # strict JSON for the page
            assert (await client.get("/api/v1/gateways/gw-x/series")).status == 200
            assert (await client.get("/api/v1/gateways/gw-x/pushes")).status == 200
        finally:
            await rogue.stop()
            await client.close()

    run(main())
