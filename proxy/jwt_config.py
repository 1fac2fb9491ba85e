"""The `[proxy.jwt]` table: who issues the tokens the sidecar accepts, for which audience, the keys
that sign them (PEM public keys or certificates, shared-secret files, JWKS documents on disk),
the algorithms allowed, and which claims say what the caller may do."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from edge_wire.settings import ConfigError, Table, Text

# Every algorithm the verifier knows, and the key type each one must be used with.
ALGORITHM_KEYS = {
    "HS256": "oct", "HS384": "oct", "HS512": "oct",
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC P-256", "ES384": "EC P-384", "ES512": "EC P-521",
    "EdDSA": "OKP",
}
Algorithm = Literal[tuple(ALGORITHM_KEYS)]  # type: ignore[valid-type]  # the names above, stated once
DEFAULT_ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
_KEY_FILES = ("pem_file", "secret_file", "jwks_file")
Names = Text | Annotated[tuple[Text, ...], Meta(min_length=1)]  # one string is a list of one


class KeySource(Table):
    """One entry of `keys`: exactly one file, and for PEM and secret files an optional kid that
    tokens name in their header (JWKS documents carry their own kids)."""

    kid: Annotated[Text | None, Meta(description="the kid tokens name (PEM and secret files)", examples=["k1"])] = None
    pem_file: Annotated[Text | None, Meta(description="a public key or certificate, PEM (RSA, EC, Ed25519/Ed448)",
                                          examples=["/etc/edge-runtime/jwt-rsa.pem"])] = None
    secret_file: Annotated[Text | None, Meta(description="an HMAC secret, its bytes as they are (a final newline dropped)",
                                             examples=["/etc/edge-runtime/jwt-hs.key"])] = None
    jwks_file: Annotated[Text | None, Meta(description='a JWKS document {"keys": [...]}',
                                           examples=["/etc/edge-runtime/jwks.json"])] = None

    def check(self) -> None:
        if sum(getattr(self, k) is not None for k in _KEY_FILES) != 1:
            raise ConfigError(f"needs exactly one of {', '.join(_KEY_FILES)}")
        if self.kid is not None and self.jwks_file is not None:
            raise ConfigError("kid: a JWKS document names its own keys; drop kid")

    @property
    def path(self) -> str:
        return next(p for p in (self.pem_file, self.secret_file, self.jwks_file) if p is not None)


class JwtConfig(Table):
    """Accept JWT bearer tokens too (docs/http-api.md, "Authentication")."""

    issuer: Annotated[Names, Meta(description="accepted `iss` values (a string or a list)", examples=["https://login.example.net"])]
    audience: Annotated[Names, Meta(description="the token's `aud` must name one of these", examples=[["edge-gateway"]])]
    keys: Annotated[tuple[KeySource, ...], Meta(
        min_length=1, description="the keys that sign tokens, each with exactly one of pem_file, secret_file, jwks_file")]
    algorithms: Annotated[tuple[Algorithm, ...], Meta(min_length=1, description=f"of {', '.join(ALGORITHM_KEYS)}")] = DEFAULT_ALGORITHMS
    leeway_s: Annotated[float, Meta(ge=0, le=600, description="clock skew allowed on exp, nbf and iat")] = 30.0
    require_exp: Annotated[bool, Meta(description="refuse tokens that never expire")] = True
    reload_interval_s: Annotated[float, Meta(
        ge=0, le=86400, description="how often key files are checked for changes (SIGHUP: at once)")] = 5.0
    models_claim: Annotated[Text, Meta(description="list (or space-separated string) of model names; absent: all")] = "models"
    max_tokens_claim: Annotated[Text, Meta(description="cap on max_tokens per request; absent: none")] = "max_tokens"
    tier_claim: Annotated[Text, Meta(description="name in [proxy.rate_limit_tiers]; absent: the default limits")] = "tier"

    def check(self) -> None:
        for name in ("issuer", "audience"):
            if isinstance(getattr(self, name), str):
                msgspec.structs.force_setattr(self, name, (getattr(self, name),))
