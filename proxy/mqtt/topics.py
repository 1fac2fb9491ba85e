"""The topic tree of docs/DESIGN.md under a configurable prefix (default `edge`), and the rules
for the names that go into it (gateway ids, group names)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_wire.settings import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Second-level words the tree uses for itself: a gateway so named would collide with them.
RESERVED = frozenset({"group", "offload"})


def check_name(key: str, value: object) -> str:
    """A gateway id or group name: 1 to 64 of A-Z a-z 0-9 . _ - (not starting with . _ -)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{key}: must be 1 to 64 of A-Z a-z 0-9 . _ - starting with a letter or digit, got {value!r}")
    if value in RESERVED:
        raise ConfigError(f"{key}: {value!r} is reserved in the topic tree")
    return value


def check_prefix(key: str, value: object) -> str:
    """One or more `/`-separated levels, no wildcards, no `$` (broker-internal topics)."""
    if not isinstance(value, str) or not value or any(
        not level or not _NAME.fullmatch(level) for level in value.split("/")
    ):
        raise ConfigError(f"{key}: must be levels of A-Z a-z 0-9 . _ - separated by /, got {value!r}")
    return value


@dataclass(frozen=True)
class Topics:
    prefix: str = "edge"

    def status(self, gw: str) -> str:
        return f"{self.prefix}/{gw}/status"

    def telemetry(self, gw: str) -> str:
        return f"{self.prefix}/{gw}/telemetry"

    def desired(self, gw: str) -> str:
        return f"{self.prefix}/{gw}/config/desired"

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/config/desired"

    def reported(self, gw: str) -> str:
        return f"{self.prefix}/{gw}/config/reported"

    def infer_request(self, gw: str) -> str:
        return f"{self.prefix}/{gw}/infer/request"

    def offload_request(self, share_group: str | None = None) -> str:
        """The offload topic; with `share_group`, the shared subscription cloud workers take."""
        topic = f"{self.prefix}/offload/request"
        return f"$share/{share_group}/{topic}" if share_group else topic

    def offload_presence(self, worker: str = "+") -> str:
        """Where a cloud worker (its client id) says it is online or draining; `+`: every worker's."""
        return f"{self.prefix}/offload/worker/{worker}"

    def offload_reply(self, gw: str) -> str:
        return f"{self.prefix}/{gw}/offload/reply"

    def gateway_of(self, topic: str) -> str | None:
        """The gateway id in a per-gateway topic (`{prefix}/{gw}/...`), else None."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        gw = topic[len(head):].split("/", 1)[0]
        return None if gw in RESERVED else gw
