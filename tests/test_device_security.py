"""The device front from an attacker's side, against a real Mosquitto (issue 14): with `[devices]`
off nothing answers on infer/request; a device's grant (from config, or an API key or JWT in the
request, v5 user property or 3.1.1 payload field) bounds what it may ask exactly as on HTTP;
per-device rate-limit buckets are a bounded LRU."""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

import jwt
import msgpack
import pytest
from engine_harness import Engine
from gateway_harness import Gateway, settings
from test_device_front import Device, run

from proxy.auth.keys import hash_key
from proxy.config import ProxyConfig
from proxy.core.errors import ApiError
from proxy.core.ratelimit import RateLimiter
from proxy.jwt_config import JwtConfig

GW = "gw-sec"
ISS, AUD = "https://issuer.test", "edge-gateway"
API_KEY = "sk-device-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="devsec-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture(scope="module")
def hs_secret():
    with tempfile.TemporaryDirectory(prefix="devsec-key-", dir="/tmp") as d:
        secret = secrets.token_bytes(32)
        (Path(d) / "hs.key").write_bytes(secret)
        yield Path(d) / "hs.key", secret


@pytest.fixture(scope="module")
def gateway(broker, engine, hs_secret):
    """Devices on, a grant required: `capped` may use 3 tokens of model tiny; the rest need a credential."""
    jwt_config = JwtConfig(issuer=ISS, audience=AUD, keys=({"secret_file": str(hs_secret[0]), "kid": "hs"},), algorithms=("HS256",))
    config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",), api_keys=(hash_key(API_KEY),),
                         jwt=jwt_config)
    devices = {"enabled": True, "rate_limit_requests_per_min": 0, "grants": {"capped": {"models": ["tiny"], "max_tokens": 3}}}
    with Gateway(config, settings(broker.url, GW, devices=devices)) as gw:
        yield gw


def token(secret: bytes, **claims) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISS, "aud": AUD, "sub": "dev", "iat": now, "exp": now + 300, **claims}, secret,
                      algorithm="HS256", headers={"kid": "hs"})


async def ask(url: str, name: str, body: dict, protocol: str = "5", **props) -> dict:
    """One request of device `name` on its own topics; its reply."""
    async with Device(url, name, protocol=protocol, gateway=GW) as dev:
        await dev.watch(f"edge/{GW}/infer/reply/{name}")
        dev.send(json.dumps(body).encode(), **props)
        return (await dev.next())[1]


def test_with_devices_off_nothing_answers_on_infer_request(broker, engine):
    """The default: a gateway with a broker (for offload or fleet) serves no device at all."""
    with Gateway(ProxyConfig(engine_socket=str(engine.socket_path)), settings(broker.url, "gw-off")) as gw:
        assert gw.services.devices is None

        async def main():
            async with Device(broker.url, "dev-x", gateway="gw-off") as dev:
                await dev.watch("edge/gw-off/#")
                for topic in ("edge/gw-off/infer/request", "edge/gw-off/infer/request/dev-x"):
                    dev.client.publish(topic, json.dumps({"prompt": "x", "reply_to": "edge/gw-off/infer/reply/dev-x"}).encode(),
                                       qos=1)
                await asyncio.sleep(1.5)
                seen = set()
                while not dev.got.empty():
                    seen.add(dev.got.get_nowait().topic)
                return seen

        assert run(main()) == {"edge/gw-off/infer/request", "edge/gw-off/infer/request/dev-x"}
        assert gw.metric("edge_proxy_routed_requests_total", route="local", front="mqtt") == 0


def test_a_device_without_grant_or_credential_is_refused(broker, gateway):
    reply = run(ask(broker.url, "stranger", {"prompt": "x", "max_tokens": 2}))
    assert reply["type"] == "error" and (reply["error"]["status"], reply["error"]["code"]) == (401, "missing_credential")


def test_a_configured_grant_caps_model_and_max_tokens_as_a_jwt_would(broker, gateway):
    over_cap = run(ask(broker.url, "capped", {"prompt": "x", "model": "tiny", "max_tokens": 50}))
    assert (over_cap["error"]["status"], over_cap["error"]["code"], over_cap["error"]["param"]) == \
        (403, "max_tokens_exceeded", "max_tokens")
    other_model = run(ask(broker.url, "capped", {"prompt": "x", "model": "big"}))
    assert (other_model["error"]["status"], other_model["error"]["code"]) == (403, "model_not_allowed")
    served = run(ask(broker.url, "capped", {"prompt": "the quick", "model": "tiny"}))  # the cap is also its default
    assert served["type"] == "result" and served["usage"]["completion_tokens"] <= 3


def test_a_jwt_in_a_v5_user_property_is_checked_as_on_http(broker, gateway, hs_secret):
    secret = hs_secret[1]
    good = run(ask(broker.url, "jwt-dev", {"prompt": "x", "max_tokens": 2},
                   user_properties=(("authorization", f"Bearer {token(secret)}"),)))
    assert good["type"] == "result"
    capped = run(ask(broker.url, "jwt-dev", {"prompt": "x", "max_tokens": 9},
                     user_properties=(("authorization", f"Bearer {token(secret, max_tokens=4)}"),)))
    assert capped["error"]["code"] == "max_tokens_exceeded"
    forged = run(ask(broker.url, "jwt-dev", {"prompt": "x"},
                     user_properties=(("authorization", f"Bearer {token(b'not-the-key' * 3)}"),)))
    assert (forged["error"]["status"], forged["error"]["code"]) == (401, "invalid_token")
    assert "bad signature" in forged["error"]["message"]
    expired = run(ask(broker.url, "jwt-dev", {"prompt": "x"},
                      user_properties=(("authorization", f"Bearer {token(secret, exp=int(time.time()) - 600)}"),)))
    assert expired["error"]["message"] == "invalid bearer token: token expired"


def test_a_311_device_carries_its_credential_in_the_payload(broker, gateway, hs_secret):
    reply_to = f"edge/{GW}/infer/reply/dev-311"
    with_key = run(ask(broker.url, "dev-311", {"prompt": "x", "max_tokens": 2, "reply_to": reply_to,
                                                "authorization": f"Bearer {API_KEY}"}, protocol="3.1.1"))
    assert with_key["type"] == "result"
    wrong_key = run(ask(broker.url, "dev-311", {"prompt": "x", "reply_to": reply_to, "authorization": "Bearer sk-guess"},
                        protocol="3.1.1"))
    assert (wrong_key["error"]["status"], wrong_key["error"]["code"]) == (401, "invalid_api_key")
    with_jwt = run(ask(broker.url, "dev-311", {"prompt": "x", "reply_to": reply_to, "model": "big",
                                                "authorization": f"Bearer {token(hs_secret[1], models=['tiny'])}"},
                       protocol="3.1.1"))
    assert with_jwt["error"]["code"] == "model_not_allowed"


def test_the_sdk_device_client_sends_its_credential(broker, gateway, hs_secret):
    from edge_client import AuthenticationError
    from edge_client.mqtt_device import DeviceClient

    for protocol, encoding in (("5", "json"), ("3.1.1", "msgpack")):
        with DeviceClient(broker.url, gateway=GW, protocol=protocol, encoding=encoding, client_id=f"sdk-sec-{encoding}",
                          authorization=f"Bearer {token(hs_secret[1])}") as dev:
            assert dev.complete("the quick", max_tokens=2, timeout=20).usage.completion_tokens <= 2
        with DeviceClient(broker.url, gateway=GW, protocol=protocol, encoding=encoding, client_id=f"sdk-anon-{encoding}") as dev, \
                pytest.raises(AuthenticationError):
            dev.complete("the quick", max_tokens=2, timeout=20)


def test_per_device_concurrency(broker, gateway):
    """Past `max_concurrent_per_device` (2) a device's requests are refused 429; others still served."""
    async def main():
        async with Device(broker.url, "capped", gateway=GW) as dev:
            await dev.watch(f"edge/{GW}/infer/reply/capped")
            for i in range(4):
                dev.send(msgpack.packb({"id": f"c{i}", "prompt": "the quick", "model": "tiny", "stream": True}))
            replies = []
            while sum(r["type"] in ("done", "error") for r in replies) < 4:
                replies.append((await dev.next())[1])
            return replies

    ends = {r["id"]: r for r in run(main()) if r["type"] in ("done", "error")}
    refused = [r for r in ends.values() if r["type"] == "error"]
    assert refused and all(r["error"]["code"] == "too_many_concurrent_requests" for r in refused)
    assert ends["c0"]["type"] == "done" and ends["c1"]["type"] == "done"


def test_rate_limit_buckets_are_a_bounded_lru():
    limiter = RateLimiter(1, 0, max_clients=3)
    for device in ("a", "b", "c"):
        limiter.admit(device)
    limiter.admit("d")  # "a", least recently used, is forgotten
    limiter.admit("a")  # so it starts afresh ...
    with pytest.raises(ApiError) as refused:
        limiter.admit("d")  # ... while "d" is still remembered (and "b" was forgotten for "a")
    assert refused.value.status == 429
    limiter.admit("b")
