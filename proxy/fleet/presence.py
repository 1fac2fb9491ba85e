"""Presence: the gateway's retained status, `online` while connected, `offline` from the Last
Will (connection lost) or at a clean stop. The boot sequence number, kept in the state
directory, tells a controller which run of the gateway a status belongs to."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edge_runtime import __version__

from .atomic import atomic_write

BOOT_FILE = "boot"


def next_boot(state_dir: Path) -> int:
    """Count this start: the previous boot number (0 if none or unreadable) plus one."""
    path = Path(state_dir) / BOOT_FILE
    try:
        previous = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        previous = 0
    boot = previous + 1
    atomic_write(path, f"{boot}\n".encode(), mode=0o644)
    return boot


def status_payload(state: str, gateway_id: str, boot: int, groups: tuple[str, ...], reason: str | None = None, *,
                   allow_unsigned: bool) -> bytes:
    """JSON: {"state": "online"|"offline", "gateway", "boot", "groups", "version", "allow_unsigned", "ts"[, "reason"]}.
    `allow_unsigned`: the gateway takes unsigned desired config (the controller shows it).
    The Last Will's `ts` is the connect time (the broker sends it as it was set)."""
    doc = {"state": state, "gateway": gateway_id, "boot": boot, "groups": list(groups), "version": __version__,
           "allow_unsigned": allow_unsigned, "ts": round(time.time(), 3)}
    if reason is not None:
        doc["reason"] = reason
    return json.dumps(doc, separators=(",", ":")).encode()
