"""API keys: the config holds only their sha256 digests; a presented key is hashed and compared
with every stored digest in constant time, so neither a match nor its position leaks by timing."""

from __future__ import annotations

import hashlib
import hmac
import string

from .errors import status_error

_HEX = frozenset(string.hexdigits.lower())
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def hash_key(key: str) -> str:
    """What goes in `api_keys`: the sha256 hex digest of the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def is_key_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


class KeyChecker:
    def __init__(self, key_hashes: tuple[str, ...]) -> None:
        self._digests = [bytes.fromhex(h) for h in key_hashes]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> str:
        """The key id (a prefix of its digest, for rate limits and logs) of a valid
        `Authorization: Bearer KEY` header; raises the 401 ApiError otherwise."""
        if not authorization:
            raise status_error(401, "missing API key: send 'Authorization: Bearer KEY'", headers=_CHALLENGE)
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise status_error(401, "malformed Authorization header: expected 'Bearer KEY'", headers=_CHALLENGE)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for stored in self._digests:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(stored, digest)
        if not matched:
            raise status_error(401, "incorrect API key", headers=_CHALLENGE)
        return digest.hex()[:12]
