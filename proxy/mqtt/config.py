"""The broker connection's configuration: the `[mqtt]` table of the shared TOML file, with the
credentials overridable from the environment (systemd's EnvironmentFile=)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from msgspec import Meta

from edge_wire.settings import SECRET, Check, ConfigError, Table, Text, load_table, read_config_file

USERNAME_ENV = "EDGE_MQTT_USERNAME"
PASSWORD_ENV = "EDGE_MQTT_PASSWORD"
PROTOCOLS = ("auto", "5", "3.1.1")  # auto: MQTT v5, falling back to 3.1.1 when the broker refuses v5
_SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}


def _url(key: str, value: str) -> None:
    parse_url(value)


def _client_id(key: str, value: str) -> None:
    if not 1 <= len(value.encode()) <= 128 or any(c in value for c in "+#/"):
        raise ConfigError(f"{key}: must be 1 to 128 bytes without + # or /, got {value!r}")


# The largest payload a part accepts is 1 MiB ([proxy] max_body_bytes, offloaded prompts); the
# rest is headroom for the envelope and properties.
DEFAULT_MAX_PACKET = 2 << 20


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


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


class MqttConfig(Table):
    """The broker connection (fleet sync, offload, devices)."""

    url: Annotated[str, Meta(description="mqtt://host[:port] or mqtts://host[:port] (TLS)", examples=["mqtts://broker.example.net:8883"]),
                   Check(_url)] = "mqtt://127.0.0.1:1883"
    client_id: Annotated[str | None, Meta(description="default: the gateway id", examples=["gw-0042"]), Check(_client_id)] = None
    username: Annotated[Text | None, Meta(description=f"or ${USERNAME_ENV}", examples=["gw-0042"])] = None
    password: Annotated[Text | None, SECRET, Meta(
        description=f"better: ${PASSWORD_ENV} in /etc/edge-runtime/environment", examples=["change-me"])] = None
    ca_file: Annotated[Text | None, Meta(description="mqtts://: the CA to trust (default: the system's)",
                                         examples=["/etc/edge-runtime/broker-ca.pem"])] = None
    cert_file: Annotated[Text | None, Meta(
        description="mutual TLS: client certificate ...", examples=["/etc/edge-runtime/gateway.pem"])] = None
    key_file: Annotated[Text | None, Meta(description="... and its key", examples=["/etc/edge-runtime/gateway.key"])] = None
    tls_insecure: Annotated[bool, Meta(description="true skips the host name check (test brokers only)")] = False
    allow_plaintext: Annotated[bool, Meta(
        description="true allows mqtt:// (no TLS) to a broker off loopback: credentials and prompts cross the network "
                    "in clear (labs only)")] = False
    max_packet_bytes: Annotated[int, Meta(
        ge=4096, le=256 << 20,
        description="MQTT 5 MaximumPacketSize sent at CONNECT: the broker drops larger packets instead of sending them "
                    "(keep it above the largest payload a part accepts: [devices] max_payload_bytes, offloaded prompts)")] = DEFAULT_MAX_PACKET
    protocol: Annotated[Literal[PROTOCOLS], Meta(
        description='"auto" (MQTT 5, else 3.1.1), "5" or "3.1.1"')] = "auto"  # type: ignore[valid-type]
    keepalive_s: Annotated[int, Meta(ge=1, le=65535, description="a dead gateway is marked offline within about 1.5x this")] = 30
    connect_timeout_s: Annotated[float, Meta(gt=0, le=300, description="to connect and get CONNACK")] = 10.0
    reconnect_min_s: Annotated[float, Meta(gt=0, le=3600, description="reconnect backoff doubles from here ...")] = 0.5
    reconnect_max_s: Annotated[float, Meta(gt=0, le=3600, description="... up to here (with jitter; 2 s: back within about 2 s of a broker's return)")] = 2.0
    max_queued: Annotated[int, Meta(
        ge=1, le=1_000_000, description="messages waiting for the broker (while disconnected, or unacknowledged)")] = 1000
    session_expiry_s: Annotated[int, Meta(
        ge=0, le=0xFFFFFFFF, description="0: a clean session on every connect; else the broker keeps it this long")] = 0

    def check(self) -> None:
        address = self.address
        if not address.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ConfigError("ca_file: TLS files need an mqtts:// url")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file: cert_file and key_file go together (mutual TLS)")
        if self.password is not None and self.username is None:
            raise ConfigError("username: a password needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(f"reconnect_max_s: must be >= reconnect_min_s ({self.reconnect_min_s}), got {self.reconnect_max_s}")
        if not address.tls and not self.allow_plaintext and not is_loopback(address.host):
            raise ConfigError(f"url: {self.url} is not encrypted and {address.host} is not loopback; use mqtts:// "
                              "(TLS, the broker's certificate verified) or set allow_plaintext = true (labs only)")

    @property
    def address(self) -> BrokerAddress:
        return parse_url(self.url)


def load_mqtt_config(path: Path | None = None, environ: dict[str, str] | None = None) -> MqttConfig:
    """The `[mqtt]` table at `path` (without one: /etc/edge-runtime/config.toml if present, else
    defaults), with $EDGE_MQTT_USERNAME / $EDGE_MQTT_PASSWORD taking precedence."""
    data, path = read_config_file(path)
    return mqtt_config_from(data, path, environ)


def mqtt_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> MqttConfig:
    environ = os.environ if environ is None else environ
    loaded = {key: environ[env] for key, env in (("username", USERNAME_ENV), ("password", PASSWORD_ENV)) if environ.get(env)}
    return load_table(MqttConfig, data, "mqtt", path, **loaded)
