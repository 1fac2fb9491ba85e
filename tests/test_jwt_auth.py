"""JWT bearer tokens on the running sidecar (the real engine in-process on a tiny model): tokens
signed by keys the test makes pass (HS256, RS256, ES256, EdDSA from PEM, secret and JWKS files),
each bad token class is refused with 401 and its reason (never with the token in the logs),
claims limit models, max_tokens and the rate-limit tier, and a rotated key set takes effect
without a restart."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from engine_harness import Engine
from proxy_harness import Proxy

from edge_wire.settings import ConfigError
from proxy.config import ProxyConfig, load_config
from proxy.core.ratelimit import Limits
from proxy.http.app import build_app

ISS, AUD = "https://id.example.test/", "edge-gw"
USER = [{"role": "user", "content": "the quick brown fox"}]


# -- keys and tokens ------------------------------------------------------------------------------


def _pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Signing keys and the files that publish their public halves."""
    d = tmp_path_factory.mktemp("jwt")
    k = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "hs": os.urandom(32),
        "jwks_rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    (d / "rsa.pem").write_bytes(_pem(k["rsa"].public_key()))
    (d / "ec.pem").write_bytes(_pem(k["ec"].public_key()))
    (d / "hs.key").write_bytes(k["hs"])
    write_jwks(d / "jwks.json", {"ed-1": k["ed"].public_key(), "rsa-j": k["jwks_rsa"].public_key()})
    k["dir"] = d
    return k


def write_jwks(path: Path, public_keys: dict) -> None:
    entries = []
    for kid, key in public_keys.items():
        algo = jwt.algorithms.OKPAlgorithm if isinstance(key, ed25519.Ed25519PublicKey) else jwt.algorithms.RSAAlgorithm
        entries.append({**json.loads(algo.to_jwk(key)), "kid": kid, "use": "sig"})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)  # as an operator's deploy would: readers never see half a file


def claims(**over) -> dict:
    now = int(time.time())
    return {"iss": ISS, "aud": AUD, "sub": "app-1", "iat": now, "nbf": now, "exp": now + 300, **over}


def token(keys, kind: str, kid: str | None = None, **over) -> str:
    alg, key = {"rsa": ("RS256", keys["rsa"]), "ec": ("ES256", keys["ec"]), "ed": ("EdDSA", keys["ed"]),
                "hs": ("HS256", keys["hs"]), "jwks_rsa": ("RS256", keys["jwks_rsa"])}[kind]
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)


def raw_token(header: dict, payload: dict, sign=lambda data: b"") -> str:
    """A token built by hand: what a forger sends (alg none, HMAC keyed with a public key)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(sign(head.encode()))


def jwt_table(d: Path, **over) -> dict:
    return {"issuer": ISS, "audience": AUD, "leeway_s": 5, "keys": [
        {"pem_file": str(d / "rsa.pem"), "kid": "rsa-1"},
        {"pem_file": str(d / "ec.pem")},
        {"secret_file": str(d / "hs.key"), "kid": "hs-1"},
        {"jwks_file": str(d / "jwks.json")},
    ], **over}


# -- the running sidecar ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="ej-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture(scope="module")
def proxy(engine, keys):
    config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny", "other"),
                         jwt=jwt_table(keys["dir"]),
                         rate_limit_tiers={"trickle": Limits(requests_per_min=1), "gold": Limits(requests_per_min=600)})
    with Proxy(config) as p:
        yield p


def call(proxy: Proxy, credential: str | None, path: str = "/v1/models", body: dict | None = None):
    async def main():
        headers = {"Authorization": f"Bearer {credential}"} if credential is not None else {}
        async with aiohttp.ClientSession() as s:
            method = s.post if body is not None else s.get
            async with method(proxy.url + path, json=body, headers=headers) as r:
                return r.status, r.headers, await r.json()

    import asyncio

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_tokens_of_every_key_kind_pass(proxy, keys):
    for t in (token(keys, "rsa", "rsa-1"), token(keys, "rsa"), token(keys, "ec"), token(keys, "ed", "ed-1"),
              token(keys, "hs", "hs-1"), token(keys, "jwks_rsa", "rsa-j")):
        status, _, body = call(proxy, t)
        assert status == 200, body
        assert {m["id"] for m in body["data"]} >= {"tiny", "other"}
    status, _, body = call(proxy, token(keys, "ed", "ed-1"), "/v1/chat/completions",
                           {"model": "tiny", "messages": USER, "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_each_bad_token_is_refused_with_its_reason(proxy, keys, caplog):
    now = int(time.time())
    rsa_pem = (keys["dir"] / "rsa.pem").read_bytes()
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "token expired": token(keys, "rsa", "rsa-1", exp=now - 60, iat=now - 120, nbf=now - 120),
        "token not yet valid": token(keys, "ec", nbf=now + 120),
        "wrong audience": token(keys, "ed", "ed-1", aud="someone-else"),
        "wrong issuer": token(keys, "hs", "hs-1", iss="https://evil.example/"),
        "bad signature": jwt.encode(claims(), other_rsa, algorithm="RS256", headers={"kid": "rsa-1"}),
        "unknown signing key (kid 'nope')": token(keys, "rsa", "nope"),
        "unsupported alg 'none'": raw_token({"alg": "none", "typ": "JWT"}, claims()),
        # Algorithm confusion: HMAC keyed with the RSA public key the gateway publishes.
        "unsupported alg 'HS256' for the signing key (RSA key)": raw_token(
            {"alg": "HS256", "kid": "rsa-1"}, claims(), lambda data: hmac.new(rsa_pem, data, hashlib.sha256).digest()),
        "unsupported alg 'HS512'": jwt.encode(claims(), keys["hs"] * 2, algorithm="HS512", headers={"kid": "hs-1"}),
        "missing claim 'exp'": jwt.encode({k: v for k, v in claims().items() if k != "exp"}, keys["ec"], algorithm="ES256"),
        "malformed token": "eyJhbGciOi.broken.token",
    }
    caplog.set_level(logging.DEBUG)
    for reason, bad in cases.items():
        status, headers, body = call(proxy, bad)
        assert status == 401, (reason, body)
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_token"
        assert body["error"]["message"].startswith(f"invalid bearer token: {reason}"), body
        assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    for bad in cases.values():
        assert bad not in logged and bad.split(".")[1] not in logged  # no token (nor its payload) in any log record
    assert call(proxy, None)[0] == 401


def test_claims_limit_models_max_tokens_and_tier(proxy, keys):
    only_tiny = token(keys, "rsa", "rsa-1", models=["tiny"], max_tokens=3, sub="limited")
    status, _, body = call(proxy, only_tiny)
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    status, _, body = call(proxy, only_tiny, "/v1/chat/completions", {"model": "other", "messages": USER})
    assert status == 403 and body["error"]["code"] == "model_not_allowed" and body["error"]["param"] == "model"
    status, _, body = call(proxy, only_tiny, "/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 50})
    assert status == 403 and body["error"]["param"] == "max_tokens"
    status, _, body = call(proxy, only_tiny, "/v1/chat/completions",  # the cap is also the default
                           {"model": "tiny", "messages": USER, "temperature": 0, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3

    trickle = token(keys, "ec", tier="trickle", sub="slow-app")
    assert call(proxy, trickle)[0] == 200
    status, headers, body = call(proxy, trickle)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert call(proxy, token(keys, "ec", tier="gold", sub="fast-app"))[0] == 200  # another subject, another bucket
    status, _, body = call(proxy, token(keys, "ec", tier="platinum"))
    assert status == 403 and body["error"]["code"] == "unknown_tier"


def test_api_keys_still_work_beside_tokens(engine, keys):
    from proxy.auth.keys import hash_key

    config = ProxyConfig(engine_socket=str(engine.socket_path), api_keys=(hash_key("sk-test-1"),), jwt=jwt_table(keys["dir"]))
    with Proxy(config) as p:
        assert call(p, "sk-test-1")[0] == 200
        assert call(p, token(keys, "ed", "ed-1"))[0] == 200
        status, _, body = call(p, "sk-wrong")
        assert status == 401 and body["error"]["message"] == "incorrect API key"


def test_rotated_keys_take_effect_without_restart(engine, keys, tmp_path):
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    jwks = tmp_path / "rotating.json"
    write_jwks(jwks, {"2024": old.public_key()})
    config = ProxyConfig(engine_socket=str(engine.socket_path), jwt={
        "issuer": ISS, "audience": AUD, "keys": [{"jwks_file": str(jwks)}], "reload_interval_s": 0})

    def signed(key, kid):
        return jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": kid})

    with Proxy(config) as p:
        assert call(p, signed(old, "2024"))[0] == 200
        write_jwks(jwks, {"2024": old.public_key(), "2025": new.public_key()})  # the overlap of a rotation
        assert call(p, signed(new, "2025"))[0] == 200 and call(p, signed(old, "2024"))[0] == 200
        write_jwks(jwks, {"2025": new.public_key()})  # the old key retired: its tokens stop at once
        status, _, body = call(p, signed(old, "2024"))
        assert status == 401 and "unknown signing key" in body["error"]["message"]
        jwks.write_text("{ not json")  # a broken deploy keeps the keys in force
        assert call(p, signed(new, "2025"))[0] == 200


def test_sighup_reload_reads_keys_at_once(engine, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "k.pem"
    pem.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    config = ProxyConfig(engine_socket=str(engine.socket_path), jwt={
        "issuer": ISS, "audience": AUD, "keys": [{"pem_file": str(pem), "kid": "k"}], "reload_interval_s": 3600})
    good = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k"})
    with Proxy(config) as p:
        assert call(p, good)[0] == 401  # bad signature: the file holds another key
        pem.write_bytes(_pem(key.public_key()))
        assert call(p, good)[0] == 401  # not checked again for an hour...
        p.sidecar.auth.reload()  # ...unless told (edge-proxy does this on SIGHUP)
        assert call(p, good)[0] == 200


@pytest.mark.parametrize("table, message", [
    ({"audience": AUD, "keys": [{"pem_file": "x"}]}, "jwt.issuer: required"),
    ({"issuer": ISS, "audience": AUD, "keys": []}, "jwt.keys: must be a non-empty list"),
    ({"issuer": ISS, "audience": AUD, "keys": [{"pem_file": "a", "secret_file": "b"}]}, "jwt.keys[0]: needs exactly one of"),
    ({"issuer": ISS, "audience": AUD, "keys": [{"pem_file": "a"}], "algorithms": ["none"]}, "jwt.algorithms[0]: must be one of"),
    ({"issuer": ISS, "audience": AUD, "keys": [{"pem_file": "a"}], "leeway_s": -1}, "jwt.leeway_s: must be a number"),
    ({"issuer": ISS, "audience": AUD, "keys": [{"pem_file": "a"}], "colour": 1}, "jwt: unknown key 'colour'"),
])
def test_config_errors_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ProxyConfig(jwt=table)


def test_config_file_and_key_file_errors(tmp_path, keys):
    path = tmp_path / "config.toml"
    path.write_text(f"""
[proxy]
host = "0.0.0.0"
[proxy.jwt]
issuer = "{ISS}"
audience = ["{AUD}", "other-aud"]
keys = [{{ pem_file = "{keys['dir'] / 'rsa.pem'}", kid = "a" }}]
[proxy.rate_limit_tiers.gold]
requests_per_min = 100
""")
    config = load_config(path, environ={})
    assert config.jwt.audience == (AUD, "other-aud") and config.rate_limit_tiers["gold"].requests_per_min == 100
    path.write_text("[proxy.rate_limit_tiers.gold]\nrequests_per_minute = 1\n")
    with pytest.raises(ConfigError, match=r"rate_limit_tiers.gold: unknown key 'requests_per_minute'"):
        load_config(path, environ={})
    private = tmp_path / "private.pem"
    private.write_bytes(keys["ec"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    for source, message in (({"pem_file": str(tmp_path / "missing.pem")}, "cannot read"),
                            ({"pem_file": str(private)}, "holds a private key"),
                            ({"secret_file": str(keys["dir"] / "rsa.pem"), "kid": "s"}, "looks like a PEM key"),
                            ({"jwks_file": str(keys["dir"] / "rsa.pem")}, "not a JSON document")):
        config = ProxyConfig(jwt={"issuer": ISS, "audience": AUD, "keys": [source]})
        with pytest.raises(ConfigError, match=f"jwt.keys: .*{message}"):
            build_app(config)


def test_a_binary_secret_that_starts_like_json_is_a_secret_and_a_jwk_is_not(tmp_path):
    """Random secret bytes start with `{` one time in 256: only a real JWK is refused as a secret."""
    secret, jwk = tmp_path / "secret.key", tmp_path / "jwk.key"
    secret.write_bytes(b" {" + bytes(range(200, 240)))
    jwk.write_text('{"kty": "oct", "k": "' + "A" * 48 + '"}')
    build_app(ProxyConfig(jwt={"issuer": ISS, "audience": AUD, "keys": [{"secret_file": str(secret), "kid": "s"}]}))
    with pytest.raises(ConfigError, match="looks like a PEM key or JWK"):
        build_app(ProxyConfig(jwt={"issuer": ISS, "audience": AUD, "keys": [{"secret_file": str(jwk), "kid": "s"}]}))
