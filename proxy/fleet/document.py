"""Desired-config documents: their shape, and decoding them (and other fleet payloads) from MQTT.

    {"version": 1767225600000,          # the issue time in ms since the epoch (any integer >= 1 not ahead of
                                        # the gateway's clock by more than its skew); newer than the last
     "target": "gw-12" | "group:lab",   # whom it is for: a document is valid on its own topic only
     "config": {"proxy": {"rate_limit_requests_per_min": 120}, "fleet": {"telemetry_period_s": 5}},
     "issued_at": 1767225600.0,         # optional: when, and (optional) by whom
     "issued_by": "ops@laptop",
     "reset": true,                     # optional: taken whatever the applied version (signed, fresh: sync.py)
     "signature": "base64..."}          # required unless the gateway allows unsigned pushes (signing.py)

`config` holds the tables of config.toml a controller manages; each document is the whole
desired state: a key it leaves out goes back to the gateway's own file (or default)."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack

from .signing import SIGNATURE_FIELD, canonical_bytes

MAX_DOCUMENT_BYTES = 256 << 10
MAX_VERSION = (1 << 63) - 1
GROUP_PREFIX = "group:"
_FIELDS = ("version", "target", "config", "issued_at", "issued_by", "reset", SIGNATURE_FIELD)


class DocumentError(Exception):
    """A document that cannot be accepted, with the reasons by field (or by config key)."""

    def __init__(self, reasons: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in reasons.items()))
        self.reasons = reasons


def group_target(group: str) -> str:
    return GROUP_PREFIX + group


def decode_payload(payload: bytes) -> Any:
    """JSON (what edgectl sends, and what operators type) or msgpack (what telemetry uses)."""
    if payload.lstrip()[:1] in (b"{", b"["):
        return json.loads(payload)
    return msgpack.unpackb(payload, raw=False, strict_map_key=True)


def parse_desired(payload: bytes, expected_target: str) -> dict[str, Any]:
    """The document in `payload`, checked for shape (not yet for signature, version or values)."""
    if len(payload) > MAX_DOCUMENT_BYTES:
        raise DocumentError({"document": f"{len(payload)} bytes, over the limit of {MAX_DOCUMENT_BYTES}"})
    try:
        doc = decode_payload(payload)
    except (ValueError, msgpack.UnpackException) as exc:
        raise DocumentError({"document": f"not JSON or msgpack ({exc})"}) from None
    if not isinstance(doc, dict):
        raise DocumentError({"document": "must be an object"})
    reasons: dict[str, str] = {}
    for key in doc:
        if key not in _FIELDS:
            reasons[str(key)] = f"unknown field (known: {', '.join(_FIELDS)})"
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        reasons["version"] = f"must be an integer in [1, 2^63-1], got {version!r}"
    if doc.get("target") != expected_target:
        reasons["target"] = f"must be {expected_target!r} on this topic, got {doc.get('target')!r}"
    config = doc.get("config")
    if not isinstance(config, dict) or not all(isinstance(t, dict) for t in config.values()):
        reasons["config"] = "must be an object of tables (objects)"
    if "issued_at" in doc and (isinstance(doc["issued_at"], bool) or not isinstance(doc["issued_at"], (int, float))):
        reasons["issued_at"] = "must be a number (seconds since the epoch)"
    if "issued_by" in doc and not isinstance(doc["issued_by"], str):
        reasons["issued_by"] = "must be a string"
    if "reset" in doc and doc["reset"] is not True:
        reasons["reset"] = "must be true when present (a signed version reset)"
    if SIGNATURE_FIELD in doc and not isinstance(doc[SIGNATURE_FIELD], str):
        reasons[SIGNATURE_FIELD] = "must be a base64 string"
    try:
        canonical_bytes(doc)
    except (TypeError, ValueError):
        reasons["document"] = "values must be JSON values (no binary, NaN or infinity)"
    if reasons:
        raise DocumentError(reasons)
    return doc


def make_desired(target: str, version: int, config: dict[str, dict[str, Any]], issued_by: str | None = None,
                 reset: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": version, "target": target, "config": config, "issued_at": round(time.time(), 3)}
    if issued_by:
        doc["issued_by"] = issued_by
    if reset:
        doc["reset"] = True
    return doc


def flatten(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"proxy": {"port": 1}} -> {"proxy.port": 1}: the key names used in reports and hooks."""
    return {f"{table}.{key}": value for table, values in config.items() for key, value in values.items()}
