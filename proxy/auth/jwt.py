"""JWT bearer tokens: the header's `alg` must be one the config allows and fit the key's type
(`none` never does), the key is chosen by `kid` (or tried in turn without one), then the
signature, `exp`, `nbf`, `iat`, `iss` and `aud` are checked with a small leeway, and the claims
become a Grant (models, max_tokens cap, rate-limit tier). A refusal says which check failed;
the token itself is never logged. Verdicts are cached per token (by digest) until the key set
changes, so a client's repeated token costs a dict lookup and a clock check."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import jwt

from ..core.errors import ApiError
from ..jwt_config import JwtConfig
from .jwt_keys import KeyStore, VerifyKey
from .keys import Grant

log = logging.getLogger("proxy.jwt")

_CACHE_MAX = 4096


class TokenRefused(Exception):
    """A token that fails a check; the message is the reason given to the client."""


def looks_like_jwt(credential: str) -> bool:
    """A compact JWS: three base64url parts, the first a JSON object ('{"' encodes as eyJ)."""
    return credential.startswith("eyJ") and credential.count(".") == 2


def refusal(reason: str) -> ApiError:
    return ApiError(401, f"invalid bearer token: {reason}", type="authentication_error", code="invalid_token",
                    headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'})


class JwtVerifier:
    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self.store = KeyStore(config.keys, config.algorithms, config.reload_interval_s)
        self._require = ["exp"] if config.require_exp else []
        self._cache: dict[bytes, tuple[int, Grant, float | None, float | None]] = {}  # digest -> (generation, grant, exp, nbf)

    def reload(self) -> None:
        self.store.reload()

    def verify(self, token: str) -> Grant:
        """The token's Grant; raises the 401 ApiError naming the check that failed."""
        keys = self.store.keys()  # first: a changed key set voids the cache
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] == self.store.generation:
            _, grant, exp, nbf = cached
            now, leeway = time.time(), self.config.leeway_s
            if exp is not None and now > exp + leeway:
                del self._cache[digest]
                raise refusal("token expired")
            if nbf is None or now >= nbf - leeway:
                return grant
        try:
            claims = self._decode(token, keys)
            grant = self._grant(claims)
        except TokenRefused as exc:
            log.debug("bearer token refused", extra={"reason": str(exc)})
            raise refusal(str(exc)) from None
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()  # simplest bound: verdicts are cheap to make again
        self._cache[digest] = (self.store.generation, grant, _number(claims.get("exp")), _number(claims.get("nbf")))
        return grant

    def _decode(self, token: str, keys: tuple[VerifyKey, ...]) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenRefused("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise TokenRefused(f"unsupported alg {_show(alg)} (allowed: {', '.join(self.config.algorithms)})")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("malformed token (kid is not a string)")
        named = [k for k in keys if k.kid == kid] if kid is not None else list(keys)
        if not named:
            raise TokenRefused(f"unknown signing key (kid {_show(kid)})")
        candidates = [k for k in named if alg in k.algorithms]
        if not candidates:
            # e.g. HS256 with an RSA public key as the "secret": algorithm confusion.
            kinds = ", ".join(sorted({k.kind for k in named}))
            raise TokenRefused(f"unsupported alg {_show(alg)} for the signing key ({kinds} key)" if kid is not None
                               else f"unknown signing key (none fits alg {_show(alg)})")
        for key in candidates:
            try:
                return jwt.decode(
                    token, key.key, algorithms=[alg], audience=list(self.config.audience),
                    issuer=list(self.config.issuer), leeway=self.config.leeway_s,
                    options={"require": self._require, "verify_signature": True},
                )
            except jwt.InvalidSignatureError:
                continue  # without a kid, another key may have signed it
            except jwt.ExpiredSignatureError:
                raise TokenRefused("token expired") from None
            except jwt.ImmatureSignatureError:
                raise TokenRefused("token not yet valid") from None
            except jwt.InvalidAudienceError:
                raise TokenRefused("wrong audience") from None
            except jwt.InvalidIssuerError:
                raise TokenRefused("wrong issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise TokenRefused(f"missing claim {exc.claim!r}") from None
            except jwt.InvalidTokenError as exc:
                raise TokenRefused(f"invalid token ({type(exc).__name__})") from None
        raise TokenRefused("bad signature")

    def _grant(self, claims: dict[str, Any]) -> Grant:
        config = self.config
        who = f"{claims.get('iss', '')}\0{claims.get('sub', '')}"
        client = "jwt:" + hashlib.sha256(who.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        models = claims.get(config.models_claim)
        if models is not None:
            if isinstance(models, str):
                models = models.split()
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise TokenRefused(f"claim {config.models_claim!r} must be a list of model names")
            models = frozenset(models)
        max_tokens = claims.get(config.max_tokens_claim)
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            raise TokenRefused(f"claim {config.max_tokens_claim!r} must be a positive integer")
        tier = claims.get(config.tier_claim)
        if tier is not None and (not isinstance(tier, str) or not tier):
            raise TokenRefused(f"claim {config.tier_claim!r} must be a non-empty string")
        return Grant(client, models, max_tokens, tier)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _show(value: Any) -> str:
    """A header value, quoted and cut short, for the client's error message."""
    text = repr(value)
    return text if len(text) <= 66 else text[:63] + "...'"
