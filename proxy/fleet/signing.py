"""Ed25519 signatures on desired-config documents.

What is signed is the canonical JSON of the document without its `signature` field: keys
sorted, no whitespace (`,` and `:` separators), non-ASCII characters as UTF-8, numbers as
Python's json module writes them. The signature is its base64 (standard alphabet)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_wire.settings import ConfigError

SIGNATURE_FIELD = "signature"


class KeyFileError(ConfigError):
    """A key file that cannot be read or is not an Ed25519 key."""


def canonical_bytes(document: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of `document` carrying its signature."""
    signature = key.sign(canonical_bytes(document))
    return {**document, SIGNATURE_FIELD: base64.b64encode(signature).decode()}


def verify(document: dict[str, Any], key: Ed25519PublicKey) -> str | None:
    """None if the signature verifies, else why not."""
    encoded = document.get(SIGNATURE_FIELD)
    if not isinstance(encoded, str):
        return "missing (a signed document is required)"
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return "not base64"
    try:
        key.verify(signature, canonical_bytes(document))
    except InvalidSignature:
        return "does not verify with the controller's public key"
    return None


def generate_keypair(private_path: Path, public_path: Path) -> Ed25519PublicKey:
    """Write a new private key (PKCS#8 PEM, mode 0600, never overwriting) and its public key (PEM)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key()
    Path(public_path).write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: cannot load the private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: cannot load the public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def public_key_text(key: Ed25519PublicKey) -> str:
    """The raw 32-byte key in base64, to compare keys at a glance."""
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
