"""The console's settings: the `[console]` table of the file given to `edgectl --config` (the
same file whose `[mqtt]` says how to reach the broker), with `edgectl serve` flags laid over it.

Access follows the sidecar's rule (proxy/config.py): on loopback no credentials are needed;
anywhere else the console refuses to start unless credentials are configured (bearer tokens or
basic-auth users, stored as sha256 digests) and it serves TLS, so that they never cross the
network in the clear."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from msgspec import Meta

from edge_wire.settings import SECRET, Check, ConfigError, Table, Text, load_table
from proxy.auth.keys import is_key_hash
from proxy.mqtt.config import is_loopback


def _digest(key: str, value: str) -> None:
    if not is_key_hash(value):  # never echo it: it may be a plain secret pasted by mistake
        raise ConfigError(f"{key}: must be a sha256 hex digest (64 hex characters; see `edge-proxy hash-key`)")


def _user(key: str, value: str) -> None:
    if not value or ":" in value or len(value) > 64:
        raise ConfigError(f"{key}: a user name is 1 to 64 characters without ':'")


class ConsoleConfig(Table):
    host: Annotated[Text, Meta(description="address to listen on; off loopback, credentials and TLS are required")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="port to listen on (0: any free port)")] = 8470
    key_file: Annotated[Text | None, Meta(
        description="Ed25519 private key (edgectl keygen) the console signs pushes with; without it the console is read-only",
        examples=["/etc/edgectl/controller.key"])] = None
    tokens: Annotated[tuple[Annotated[str, Check(_digest)], ...], SECRET, Meta(
        description="sha256 digests of bearer tokens (for scripts: Authorization: Bearer TOKEN)")] = ()
    users: Annotated[dict[str, Annotated[str, Check(_digest)]], SECRET, Meta(
        description="basic-auth users: name -> sha256 digest of the password (for browsers)")] = {}
    tls_cert: Annotated[Text | None, Meta(description="PEM certificate chain to serve HTTPS with")] = None
    tls_key: Annotated[Text | None, Meta(description="PEM private key of tls_cert")] = None
    db_path: Annotated[Text | None, Meta(
        description="SQLite history file (default: in memory, gone at exit)", examples=["/var/lib/edgectl/console.sqlite3"])] = None
    history_max_age_s: Annotated[float, Meta(ge=60, le=366 * 86400, description="telemetry older than this is dropped")] = 86400.0
    history_max_bytes: Annotated[int, Meta(ge=1 << 20, le=1 << 40, description="the history's size bound (about 300 bytes a telemetry message); oldest dropped beyond")] = 256 << 20
    hot_c: Annotated[float, Meta(ge=0, le=150, description="health flag 'hot' at or above this temperature (any sensor, GPU too)")] = 85.0
    memory_percent: Annotated[float, Meta(ge=0, le=100, description="health flag 'memory' at or above this host memory use")] = 90.0
    offload_fraction: Annotated[float, Meta(
        ge=0, le=1, description="health flag 'offloading' when at least this share of recent requests went to the cloud")] = 0.5

    def check(self) -> None:
        if is_loopback(self.host):
            return
        if not self.tokens and not self.users:
            raise ConfigError(f"tokens: required when listening on {self.host} (not loopback); set [console] tokens or users "
                              "(edge-proxy hash-key)")
        if not (self.tls_cert and self.tls_key):
            raise ConfigError(f"tls_cert: required when listening on {self.host} (not loopback): credentials are sent "
                              "only over TLS; set tls_cert and tls_key")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def console_config_from(data: dict[str, Any], path: Path | None) -> ConsoleConfig:
    return load_table(ConsoleConfig, data, "console", path)
