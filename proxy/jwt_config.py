"""The `[proxy.jwt]` table: who issues the tokens the sidecar accepts, for which audience, the keys
that sign them (PEM public keys or certificates, shared-secret files, JWKS documents on disk),
the algorithms allowed, and which claims say what the caller may do."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

from edge_runtime.config import ConfigError

# Every algorithm the verifier knows, and the key type each one must be used with.
ALGORITHM_KEYS = {
    "HS256": "oct", "HS384": "oct", "HS512": "oct",
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC P-256", "ES384": "EC P-384", "ES512": "EC P-521",
    "EdDSA": "OKP",
}
DEFAULT_ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
_KEY_FILES = ("pem_file", "secret_file", "jwks_file")


@dataclass(frozen=True)
class KeySource:
    """One entry of `keys`: exactly one file, and for PEM and secret files an optional kid that
    tokens name in their header (JWKS documents carry their own kids)."""

    kid: str | None = None
    pem_file: str | None = None  # a public key or a certificate, PEM (RSA, EC P-256/384/521, Ed25519/Ed448)
    secret_file: str | None = None  # an HMAC secret, its bytes as they are (a final newline dropped)
    jwks_file: str | None = None  # a JWKS document {"keys": [...]}

    @property
    def path(self) -> str:
        return next(p for p in (self.pem_file, self.secret_file, self.jwks_file) if p is not None)


@dataclass(frozen=True)
class JwtConfig:
    issuer: tuple[str, ...]  # accepted `iss` values
    audience: tuple[str, ...]  # the token's `aud` must name one of these
    keys: tuple[KeySource, ...]
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_s: float = 30.0  # clock skew allowed on exp, nbf and iat
    require_exp: bool = True  # refuse tokens that never expire
    reload_interval_s: float = 5.0  # how often key files are checked for changes (SIGHUP: at once)
    models_claim: str = "models"  # list (or space-separated string) of model names; absent: all
    max_tokens_claim: str = "max_tokens"  # cap on max_tokens per request; absent: none
    tier_claim: str = "tier"  # name in [proxy.rate_limit_tiers]; absent: the default limits

    @classmethod
    def from_table(cls, table: Any) -> JwtConfig:
        """From the TOML table; ConfigError names the key at fault (`jwt.keys[1].pem_file: ...`)."""
        if not isinstance(table, dict):
            raise ConfigError("jwt: must be a table ([proxy.jwt])")
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise ConfigError(f"jwt: unknown key {key!r} (known: {', '.join(sorted(known))})")
        for key in ("issuer", "audience", "keys"):
            if key not in table:
                raise ConfigError(f"jwt.{key}: required")
        values = dict(table)
        values["issuer"] = _strings("jwt.issuer", table["issuer"])
        values["audience"] = _strings("jwt.audience", table["audience"])
        values["keys"] = _keys(table["keys"])
        if "algorithms" in table:
            values["algorithms"] = _algorithms(table["algorithms"])
        for key, hi in (("leeway_s", 600.0), ("reload_interval_s", 86400.0)):
            if key in table:
                _number(f"jwt.{key}", table[key], hi)
        if not isinstance(values.get("require_exp", True), bool):
            raise ConfigError(f"jwt.require_exp: must be true or false, got {table['require_exp']!r}")
        for key in ("models_claim", "max_tokens_claim", "tier_claim"):
            if key in table and (not isinstance(table[key], str) or not table[key]):
                raise ConfigError(f"jwt.{key}: must be a non-empty string, got {table[key]!r}")
        return cls(**values)


def _strings(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{name}: must be a non-empty string or a list of them, got {value!r}")
    return tuple(items)


def _keys(value: Any) -> tuple[KeySource, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("jwt.keys: must be a non-empty list of tables ({ pem_file = ... }, { secret_file = ... }, { jwks_file = ... })")
    out = []
    for i, entry in enumerate(value):
        where = f"jwt.keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table with one of {', '.join(_KEY_FILES)}")
        for key in entry:
            if key not in (*_KEY_FILES, "kid"):
                raise ConfigError(f"{where}: unknown key {key!r} (known: kid, {', '.join(_KEY_FILES)})")
        given = [k for k in _KEY_FILES if k in entry]
        if len(given) != 1:
            raise ConfigError(f"{where}: needs exactly one of {', '.join(_KEY_FILES)}")
        for key, item in entry.items():
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{where}.{key}: must be a non-empty string, got {item!r}")
        if "kid" in entry and "jwks_file" in entry:
            raise ConfigError(f"{where}.kid: a JWKS document names its own keys; drop kid")
        out.append(KeySource(**entry))
    return tuple(out)


def _algorithms(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"jwt.algorithms: must be a non-empty list, got {value!r}")
    for i, alg in enumerate(value):
        if alg not in ALGORITHM_KEYS:
            hint = " (unsigned tokens are never accepted)" if isinstance(alg, str) and alg.lower() == "none" else ""
            raise ConfigError(f"jwt.algorithms[{i}]: must be one of {', '.join(ALGORITHM_KEYS)}, got {alg!r}{hint}")
    return tuple(value)


def _number(name: str, value: Any, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not 0 <= value <= hi:
        raise ConfigError(f"{name}: must be a number in [0, {hi:g}], got {value!r}")
