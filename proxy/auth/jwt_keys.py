"""The keys that verify JWTs: read from PEM, secret and JWKS files, each pinned to the algorithms
its key type allows (so an RSA public key can never be used as an HMAC secret), and read again
when a file changes (checked every reload_interval_s) or on SIGHUP. A bad reload keeps the keys
in force and logs why."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from edge_wire.settings import ConfigError

from ..jwt_config import ALGORITHM_KEYS, KeySource

log = logging.getLogger("proxy.jwt")

MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
MIN_RSA_BITS = 2048
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class VerifyKey:
    kid: str | None
    kind: str  # "oct", "RSA", "EC P-256", ..., "OKP"
    key: Any  # bytes for HMAC, else a cryptography public key
    algorithms: frozenset[str]  # the algorithms this key may verify


def key_kind(key: Any) -> str:
    if isinstance(key, bytes):
        return "oct"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "OKP"
    raise KeyFileError(f"unsupported key type {type(key).__name__}")


def load_source(source: KeySource, allowed: tuple[str, ...]) -> list[VerifyKey]:
    """The keys of one configured file, each with the allowed algorithms its type fits."""
    path = Path(source.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if source.secret_file is not None:
        secret = data[:-1] if data.endswith(b"\n") else data
        if _looks_like_public_key(secret):
            raise KeyFileError(f"{path}: looks like a PEM key or JWK, not a shared secret (use pem_file or jwks_file)")
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyFileError(f"{path}: an HMAC secret must be at least {MIN_SECRET_BYTES} bytes")
        return [_pinned(source.kid, secret, allowed, None, path)]
    if source.pem_file is not None:
        return [_pinned(source.kid, _pem_public_key(data, path), allowed, None, path)]
    return _jwks(data, allowed, path)


def _looks_like_public_key(secret: bytes) -> bool:
    """A PEM block, an OpenSSH key or a JWK put where a shared secret belongs. Random secret bytes
    can start with `{` or whitespace, so a JWK counts only when it parses as one."""
    text = secret.lstrip()
    if text.startswith((b"-----BEGIN", b"ssh-")):
        return True
    if not text.startswith(b"{"):
        return False
    try:
        parsed = json.loads(text)
    except ValueError:
        return False
    return isinstance(parsed, dict) and ("kty" in parsed or "keys" in parsed)


def _pem_public_key(data: bytes, path: Path) -> Any:
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path}: holds a private key; give the public key or certificate (signing keys stay with the issuer)")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key or certificate ({exc})") from None


def _jwks(data: bytes, allowed: tuple[str, ...], path: Path) -> list[VerifyKey]:
    try:
        document = json.loads(data)
    except ValueError:
        raise KeyFileError(f"{path}: not a JSON document") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f"{path}: a JWKS document must be an object with a list 'keys'")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: must be an object")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key: not ours to use
        if "d" in entry:
            raise KeyFileError(f"{where}: holds a private key; publish only public keys")
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise KeyFileError(f"{where}: unusable key ({exc})") from None
        kid = entry.get("kid")
        out.append(_pinned(kid if isinstance(kid, str) else None, key, allowed, entry.get("alg"), Path(where)))
    return out


def _pinned(kid: str | None, key: Any, allowed: tuple[str, ...], jwk_alg: Any, where: Path) -> VerifyKey:
    kind = key_kind(key)
    if kind == "RSA" and key.key_size < MIN_RSA_BITS:
        raise KeyFileError(f"{where}: RSA keys must have at least {MIN_RSA_BITS} bits")
    algorithms = frozenset(a for a in allowed if ALGORITHM_KEYS[a] == kind and jwk_alg in (None, a))
    if not algorithms:
        raise KeyFileError(f"{where}: no allowed algorithm fits this {kind} key (allowed: {', '.join(allowed)})")
    return VerifyKey(kid, kind, key, algorithms)


class KeyStore:
    def __init__(self, sources: tuple[KeySource, ...], allowed: tuple[str, ...], reload_interval_s: float) -> None:
        self.sources = sources
        self.allowed = allowed
        self.reload_interval_s = reload_interval_s
        self.generation = 0  # bumped on every change: cached verdicts of older keys are void
        try:
            self._keys = self._load()
        except KeyFileError as exc:
            raise ConfigError(f"jwt.keys: {exc}") from None
        self._stamp = self._stamps()
        self._checked = time.monotonic()
        self._failed_stamp: tuple[Any, ...] | None = None

    def keys(self) -> tuple[VerifyKey, ...]:
        """The keys in force, read again first if a file changed (checked at most every
        reload_interval_s)."""
        now = time.monotonic()
        if now - self._checked >= self.reload_interval_s:
            self._checked = now
            stamp = self._stamps()
            if stamp != self._stamp and stamp != self._failed_stamp:
                self._reload(stamp)
        return self._keys

    def reload(self) -> None:
        """Read every file again now (SIGHUP)."""
        self._checked = time.monotonic()
        self._reload(self._stamps())

    def _reload(self, stamp: tuple[Any, ...]) -> None:
        try:
            keys = self._load()
        except KeyFileError as exc:
            self._failed_stamp = stamp  # logged once per change of the files, not per request
            log.error("JWT keys not reloaded; the previous keys stay in force", extra={"error": str(exc)})
            return
        self._keys, self._stamp, self._failed_stamp = keys, stamp, None
        self.generation += 1
        log.info("JWT keys reloaded", extra={"keys": len(keys), "kids": [k.kid for k in keys if k.kid]})

    def _load(self) -> tuple[VerifyKey, ...]:
        return tuple(key for source in self.sources for key in load_source(source, self.allowed))

    def _stamps(self) -> tuple[Any, ...]:
        out = []
        for source in self.sources:
            try:
                st = os.stat(source.path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)
