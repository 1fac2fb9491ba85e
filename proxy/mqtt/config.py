"""The broker connection's configuration: the `[mqtt]` table of the shared TOML file, with the
credentials overridable from the environment (systemd's EnvironmentFile=)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_runtime.config import ConfigError

from .. import tomlconf

USERNAME_ENV = "EDGE_MQTT_USERNAME"
PASSWORD_ENV = "EDGE_MQTT_PASSWORD"
PROTOCOLS = ("auto", "5", "3.1.1")  # auto: MQTT v5, falling back to 3.1.1 when the broker refuses v5
_SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883, TLS); IPv6 hosts in brackets."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"url: must be a non-empty string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(f"url: scheme must be mqtt:// or mqtts://, got {url!r}")
    if parts.username is not None or parts.password is not None:
        # Config files and logs show URLs; secrets go in username/password or the environment.
        raise ConfigError(f"url: must not carry credentials; set username and password (or ${USERNAME_ENV}, ${PASSWORD_ENV})")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"url: must be scheme://host[:port] only, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"url: bad port in {url!r}") from None
    if not parts.hostname:
        raise ConfigError(f"url: no host in {url!r}")
    tls, default_port = _SCHEMES[parts.scheme]
    return BrokerAddress(parts.hostname, port if port is not None else default_port, tls)


@dataclass(frozen=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None  # None: chosen by the user of the connection (the gateway id for fleet sync)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # mqtts://: the CA bundle to trust (None: the system's)
    cert_file: str | None = None  # client certificate (mutual TLS), with key_file
    key_file: str | None = None
    tls_insecure: bool = False  # skip the host name check (self-signed test brokers only)
    protocol: str = "auto"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5  # backoff doubles from here after each failed attempt ...
    reconnect_max_s: float = 30.0  # ... up to here
    max_queued: int = 1000  # messages waiting for the broker (while disconnected, or unacknowledged)
    session_expiry_s: int = 0  # 0: a clean session on every connect; else the broker keeps it this long

    def __post_init__(self) -> None:
        tomlconf.validate(self, _RULES, _OPTIONAL)
        address = self.address
        if not address.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ConfigError("ca_file: TLS files need an mqtts:// url")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file: cert_file and key_file go together (mutual TLS)")
        if self.password is not None and self.username is None:
            raise ConfigError("username: a password needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(f"reconnect_max_s: must be >= reconnect_min_s ({self.reconnect_min_s}), got {self.reconnect_max_s}")

    @property
    def address(self) -> BrokerAddress:
        return parse_url(self.url)

    def with_overrides(self, **overrides: Any) -> MqttConfig:
        """A copy with the non-None values replaced (command-line flags win over the file)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def load_mqtt_config(path: Path | None = None, environ: dict[str, str] | None = None) -> MqttConfig:
    """The `[mqtt]` table at `path` (without one: /etc/edge-runtime/config.toml if present, else
    defaults), with $EDGE_MQTT_USERNAME / $EDGE_MQTT_PASSWORD taking precedence."""
    data, path = tomlconf.read_file(path)
    return mqtt_config_from(data, path, environ)


def mqtt_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> MqttConfig:
    environ = os.environ if environ is None else environ
    known = {f.name for f in dataclasses.fields(MqttConfig)}
    values = tomlconf.table(data, "mqtt", path, known)
    for key, env in (("username", USERNAME_ENV), ("password", PASSWORD_ENV)):
        if environ.get(env):
            values[key] = environ[env]
    try:
        return MqttConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{tomlconf.where(path, 'mqtt')} {exc}") from None


def _url(name: str, value: Any) -> None:
    parse_url(value)


def _password(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a non-empty string")  # never echo a secret


def _client_id(name: str, value: Any) -> None:
    if not isinstance(value, str) or not 1 <= len(value.encode()) <= 128 or any(c in value for c in "+#/"):
        raise ConfigError(f"{name}: must be 1 to 128 bytes without + # or /, got {value!r}")


_OPTIONAL = frozenset({"client_id", "username", "password", "ca_file", "cert_file", "key_file"})
_RULES: dict[str, tomlconf.Rule] = {
    "url": _url,
    "client_id": _client_id,
    "username": tomlconf.text,
    "password": _password,
    "ca_file": tomlconf.text,
    "cert_file": tomlconf.text,
    "key_file": tomlconf.text,
    "tls_insecure": tomlconf.boolean,
    "protocol": tomlconf.one_of(*PROTOCOLS),
    "keepalive_s": tomlconf.integer(1, 65535),
    "connect_timeout_s": tomlconf.number(0, 300, positive=True),
    "reconnect_min_s": tomlconf.number(0, 3600, positive=True),
    "reconnect_max_s": tomlconf.number(0, 3600, positive=True),
    "max_queued": tomlconf.integer(1, 1_000_000),
    "session_expiry_s": tomlconf.integer(0, 0xFFFFFFFF),
}
