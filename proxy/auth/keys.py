"""Who is calling: API keys (the config holds only their sha256 digests; a presented key is
hashed and compared with every stored digest in constant time, so neither a match nor its
position leaks by timing) and, when `[proxy.jwt]` is set, JWT bearer tokens (proxy/auth/jwt.py).
Either way the answer is a Grant: whom the rate limits count, and what the caller may do."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from ..core.errors import ApiError, status_error
from ..core.request import CompletionRequest

if TYPE_CHECKING:
    from ..jwt_config import JwtConfig

_HEX = frozenset(string.hexdigits.lower())
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class Grant:
    """What one authenticated caller may do."""

    client: str  # what rate limits count against; also the key id in the access log
    models: frozenset[str] | None = None  # model names it may use; None: all
    max_tokens: int | None = None  # cap on max_tokens per request; None: none
    tier: str | None = None  # rate-limit tier; None: the default limits

    def authorize(self, req: CompletionRequest) -> CompletionRequest:
        """The request within this grant: its model allowed, its max_tokens under the cap (the
        cap is also the default when the request names none); raises the 403 ApiError."""
        if self.models is not None and req.model not in self.models:
            raise ApiError(403, f"this token may not use model {req.model!r}", type="permission_error", param="model",
                           code="model_not_allowed")
        if self.max_tokens is None:
            return req
        asked = req.sampling.max_tokens
        if asked is not None and asked > self.max_tokens:
            raise ApiError(403, f"max_tokens {asked} exceeds this token's limit of {self.max_tokens}",
                           type="permission_error", param="max_tokens", code="max_tokens_exceeded")
        if asked is not None:
            return req
        return dataclasses.replace(req, sampling=msgspec.structs.replace(req.sampling, max_tokens=self.max_tokens))


def hash_key(key: str) -> str:
    """What goes in `api_keys`: the sha256 hex digest of the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def is_key_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def bearer(authorization: str | None, what: str = "API key", placeholder: str = "KEY") -> str:
    """The credential of an `Authorization: Bearer ...` header; raises the 401 ApiError."""
    if not authorization:
        raise status_error(401, f"missing {what}: send 'Authorization: Bearer {placeholder}'", headers=_CHALLENGE)
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise status_error(401, f"malformed Authorization header: expected 'Bearer {placeholder}'", headers=_CHALLENGE)
    return credential


class KeyChecker:
    def __init__(self, key_hashes: tuple[str, ...]) -> None:
        self._digests = [bytes.fromhex(h) for h in key_hashes]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> str:
        """The key id (a prefix of its digest, for rate limits and logs) of a valid
        `Authorization: Bearer KEY` header; raises the 401 ApiError otherwise."""
        return self.check_key(bearer(authorization))

    def check_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for stored in self._digests:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(stored, digest)
        if not matched:
            raise status_error(401, "incorrect API key", headers=_CHALLENGE)
        return digest.hex()[:12]


class Authenticator:
    """API keys and JWT bearer tokens, whichever the config enables; a credential shaped like a
    JWT goes to the JWT verifier, anything else is looked up as an API key."""

    def __init__(self, key_hashes: tuple[str, ...], jwt: JwtConfig | None) -> None:
        self.keys = KeyChecker(key_hashes)
        self.jwt = None
        if jwt is not None:
            from .jwt import JwtVerifier

            self.jwt = JwtVerifier(jwt)

    @property
    def enabled(self) -> bool:
        return self.keys.enabled or self.jwt is not None

    def reload(self) -> None:
        """Read the JWT key files again (SIGHUP)."""
        if self.jwt is not None:
            self.jwt.reload()

    def check(self, authorization: str | None) -> Grant:
        """The caller's Grant; raises the 401 ApiError saying what is wrong."""
        if self.jwt is None:
            return Grant(self.keys.check(authorization))
        from .jwt import looks_like_jwt, refusal

        if self.keys.enabled:
            credential = bearer(authorization, "API key or token", "KEY_OR_TOKEN")
        else:
            credential = bearer(authorization, "token", "TOKEN")
        if looks_like_jwt(credential):
            return self.jwt.verify(credential)
        if not self.keys.enabled:
            raise refusal("malformed token")
        return Grant(self.keys.check_key(credential))
