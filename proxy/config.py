"""The sidecar's configuration: the `[proxy]` table of the shared TOML config file (the engine
reads `[engine]`), plus API keys from the environment; a Table of the config convention
(edge_wire/settings.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from msgspec import Meta

from edge_runtime.config import default_socket_path
from edge_wire.settings import SECRET, Check, ConfigError, FromTable, LogLevel, Table, Text, load_table, read_config_file

from .auth.keys import hash_key, is_key_hash
from .core.ratelimit import Limits
from .jwt_config import JwtConfig
from .mqtt.config import is_loopback
from .safety import policy as safety_policy

API_KEYS_ENV = "EDGE_PROXY_API_KEYS"  # comma-separated plain keys, hashed on load

__all__ = ["API_KEYS_ENV", "ProxyConfig", "is_loopback", "load_config", "proxy_config_from"]


def _key_hash(key: str, value: str) -> None:
    if not is_key_hash(value):
        # Never echo the value: it may be a plain key pasted by mistake.
        raise ConfigError(f"{key}: must be a sha256 hex digest (64 hex characters; see `edge-proxy hash-key`)")


class ProxyConfig(Table):
    host: Annotated[Text, Meta(description="address to listen on")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="port to listen on")] = 8080
    engine_socket: Annotated[Text | None, Meta(
        description="default: [engine] socket_path, else the engine's default", examples=["/run/edge-runtime/engine.sock"])] = None
    api_keys: Annotated[tuple[Annotated[str, Check(_key_hash)], ...], SECRET, Meta(
        description=f"sha256 digests (edge-proxy hash-key), and ${API_KEYS_ENV}; required unless on loopback")] = ()
    rate_limit_requests_per_min: Annotated[float, Meta(ge=0, description="per key (per client address without keys); 0: off")] = 0.0
    rate_limit_tokens_per_min: Annotated[float, Meta(ge=0, description="prompt + completion tokens, per key; 0: off")] = 0.0
    max_body_bytes: Annotated[int, Meta(ge=1024, le=64 << 20, description="largest request body")] = 1 << 20
    max_prompt_chars: Annotated[int, Meta(ge=1, le=64 << 20, description="characters of all messages' content (or of the prompt)")] = 262144
    max_messages: Annotated[int, Meta(ge=1, le=1024, description="messages per chat request")] = 256
    request_timeout_s: Annotated[float, Meta(gt=0, description="passed to the engine as timeout_s")] = 120.0
    cache_enabled: Annotated[bool, Meta(description="response cache for deterministic requests")] = True
    cache_max_entries: Annotated[int, Meta(ge=1, le=10_000_000, description="responses cached")] = 1024
    cache_max_bytes: Annotated[int, Meta(ge=1024, le=1 << 40, description="bytes of cached responses")] = 16 << 20
    cache_ttl_s: Annotated[float, Meta(gt=0, description="how long a cached response is served")] = 600.0
    cache_shared: Annotated[bool, Meta(
        description="one cache for all callers (else per API key / JWT subject: a hit never tells one caller what another sent)")] = False
    model_aliases: Annotated[tuple[Annotated[str, Meta(min_length=1, max_length=256)], ...], Meta(
        description='more names for the engine\'s model, e.g. ["gpt-4o-mini"]')] = ()
    grace_s: Annotated[float, Meta(ge=0, description="requests in flight may finish this long after SIGTERM")] = 30.0
    max_connections: Annotated[int, Meta(ge=1, le=1 << 20, description=(
        "HTTP connections held at once; past it the longest idle one is closed (docs/reliability.md)"))] = 1024
    idle_timeout_s: Annotated[float, Meta(gt=0, description="a keep-alive connection waiting this long for a request is closed")] = 75.0
    header_timeout_s: Annotated[float, Meta(gt=0, description="a request's head must arrive within this of its first byte")] = 10.0
    body_timeout_s: Annotated[float, Meta(gt=0, description="a request's body must arrive within this (else 408)")] = 30.0
    access_log: Annotated[bool, Meta(description="a log line per request")] = True
    log_level: Annotated[LogLevel, Meta(description="debug, info, warning or error")] = "info"
    jwt: Annotated[JwtConfig | None, Meta(description="accept JWT bearer tokens too")] = None
    safety: Annotated[safety_policy.SafetyConfig, FromTable("safety", safety_policy.SafetyTable), Meta(
        description="the top-level [safety] table")] = safety_policy.SafetyConfig()
    rate_limit_tiers: Annotated[dict[str, Limits], Meta(
        description="limits for callers whose token names the tier (JWT tier claim)")] = {}

    def check(self) -> None:
        if not self.api_keys and self.jwt is None and not is_loopback(self.host):
            raise ConfigError(
                f"api_keys: required when listening on {self.host} (not loopback); "
                f"set [proxy] api_keys (edge-proxy hash-key) or {API_KEYS_ENV}"
            )

    def resolved_engine_socket(self) -> Path:
        return Path(self.engine_socket) if self.engine_socket else default_socket_path()


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> ProxyConfig:
    """The `[proxy]` table at `path` (without one: /etc/edge-runtime/config.toml if present, else
    defaults), with keys from $EDGE_PROXY_API_KEYS added to the configured hashes."""
    data, path = read_config_file(path)
    return proxy_config_from(data, path, environ)


def proxy_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> ProxyConfig:
    """The `[proxy]` table of an already parsed file (e.g. with a pushed config laid over it)."""
    environ = os.environ if environ is None else environ
    table = data.get("proxy", {})
    loaded: dict[str, Any] = {"safety": safety_policy.load(data, path)}
    engine = data.get("engine")
    if isinstance(table, dict) and "engine_socket" not in table and isinstance(engine, dict) \
            and isinstance(engine.get("socket_path"), str):
        loaded["engine_socket"] = engine["socket_path"]  # one file, one socket: follow the engine's
    env_keys = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if env_keys and isinstance(table, dict):
        configured = table.get("api_keys", [])
        if not isinstance(configured, list):
            raise ConfigError(f"{f'{path}: ' if path else ''}[proxy] api_keys: must be a list of sha256 hex digests")
        loaded["api_keys"] = [*configured, *(hash_key(k) for k in env_keys)]
    return load_table(ProxyConfig, data, "proxy", path, **loaded)
