"""The sidecar's configuration: the `[proxy]` table of the shared TOML config file (the engine
reads `[engine]`), plus API keys from the environment, validated with messages naming the key."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import ConfigError, default_socket_path

from . import tomlconf
from .auth.keys import hash_key, is_key_hash
from .core.ratelimit import Limits
from .jwt_config import JwtConfig
from .safety import policy as safety_policy

API_KEYS_ENV = "EDGE_PROXY_API_KEYS"  # comma-separated plain keys, hashed on load
LOG_LEVELS = ("debug", "info", "warning", "error")

__all__ = ["API_KEYS_ENV", "ConfigError", "ProxyConfig", "is_loopback", "load_config", "proxy_config_from"]


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    engine_socket: str | None = None  # None: the engine's socket_path in the same file, else its default
    api_keys: tuple[str, ...] = ()  # sha256 hex digests of the accepted keys (`edge-proxy hash-key`)
    rate_limit_requests_per_min: float = 0.0  # per key (per client address without keys); 0: off
    rate_limit_tokens_per_min: float = 0.0  # prompt + completion tokens, per key; 0: off
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 262144  # characters of all messages' content (or of the prompt)
    max_messages: int = 256
    request_timeout_s: float = 120.0  # passed to the engine as timeout_s
    cache_enabled: bool = True
    cache_max_entries: int = 1024
    cache_max_bytes: int = 16 << 20
    cache_ttl_s: float = 600.0
    model_aliases: tuple[str, ...] = ()  # more names accepted for the engine's model
    grace_s: float = 30.0  # how long requests in flight may finish after SIGTERM
    access_log: bool = True
    log_level: str = "info"
    jwt: JwtConfig | None = None  # [proxy.jwt]: accept JWT bearer tokens too (proxy/jwt_config.py)
    safety: safety_policy.SafetyConfig = safety_policy.SafetyConfig()  # the top-level [safety] table (proxy/safety/policy.py)
    # [proxy.rate_limit_tiers.NAME]: requests_per_min, tokens_per_min for callers whose token names the tier
    rate_limit_tiers: dict[str, Limits] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        tomlconf.validate(self, _RULES, _OPTIONAL)
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        if isinstance(self.jwt, dict):
            object.__setattr__(self, "jwt", JwtConfig.from_table(self.jwt))
        object.__setattr__(self, "rate_limit_tiers", {
            name: limits if isinstance(limits, Limits) else Limits(**limits) for name, limits in self.rate_limit_tiers.items()
        })
        if not self.api_keys and self.jwt is None and not is_loopback(self.host):
            raise ConfigError(
                f"api_keys: required when listening on {self.host} (not loopback); "
                f"set [proxy] api_keys (edge-proxy hash-key) or {API_KEYS_ENV}"
            )

    def with_overrides(self, **overrides: Any) -> ProxyConfig:
        """A copy with the non-None values replaced (command-line flags win over the file)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def resolved_engine_socket(self) -> Path:
        return Path(self.engine_socket) if self.engine_socket else default_socket_path()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> ProxyConfig:
    """The `[proxy]` table at `path` (without one: /etc/edge-runtime/config.toml if present, else
    defaults), with keys from $EDGE_PROXY_API_KEYS added to the configured hashes."""
    data, path = tomlconf.read_file(path)
    return proxy_config_from(data, path, environ)


def proxy_config_from(data: dict[str, Any], path: Path | None, environ: dict[str, str] | None = None) -> ProxyConfig:
    """The `[proxy]` table of an already parsed file (e.g. with a pushed config laid over it)."""
    environ = os.environ if environ is None else environ
    values = tomlconf.table(data, "proxy", path, {f.name for f in dataclasses.fields(ProxyConfig)} - {"safety"})
    values["safety"] = safety_policy.load(data, path)
    engine = data.get("engine")
    if "engine_socket" not in values and isinstance(engine, dict) and isinstance(engine.get("socket_path"), str):
        values["engine_socket"] = engine["socket_path"]  # one file, one socket: follow the engine's
    env_keys = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if env_keys:
        configured = values.get("api_keys", [])
        if not isinstance(configured, list):
            raise ConfigError(f"{tomlconf.where(path, 'proxy')} api_keys: must be a list of sha256 hex digests")
        values["api_keys"] = [*configured, *(hash_key(k) for k in env_keys)]
    try:
        return ProxyConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{tomlconf.where(path, 'proxy')} {exc}") from None


def _names(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: must be a list of strings, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > 256:
            raise ConfigError(f"{name}[{i}]: must be a non-empty string of at most 256 characters, got {item!r}")


def _key_hashes(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: must be a list of sha256 hex digests")
    for i, item in enumerate(value):
        if not is_key_hash(item):
            # Never echo the value: it may be a plain key pasted by mistake.
            raise ConfigError(f"{name}[{i}]: must be a sha256 hex digest (64 hex characters; see `edge-proxy hash-key`)")


def _jwt(name: str, value: Any) -> None:
    if not isinstance(value, (dict, JwtConfig)):
        raise ConfigError(f"{name}: must be a table ([proxy.jwt])")


def _tiers(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table of tiers ([proxy.rate_limit_tiers.NAME])")
    for tier, limits in value.items():
        if isinstance(limits, Limits):
            continue
        if not isinstance(limits, dict):
            raise ConfigError(f"{name}.{tier}: must be a table (requests_per_min, tokens_per_min)")
        for key, item in limits.items():
            if key not in ("requests_per_min", "tokens_per_min"):
                raise ConfigError(f"{name}.{tier}: unknown key {key!r} (known: requests_per_min, tokens_per_min)")
            tomlconf.number(0)(f"{name}.{tier}.{key}", item)


_OPTIONAL = frozenset({"engine_socket", "jwt"})
_RULES: dict[str, tomlconf.Rule] = {
    "host": tomlconf.text,
    "port": tomlconf.integer(0, 65535),
    "engine_socket": tomlconf.text,
    "api_keys": _key_hashes,
    "rate_limit_requests_per_min": tomlconf.number(0),
    "rate_limit_tokens_per_min": tomlconf.number(0),
    "max_body_bytes": tomlconf.integer(1024, 64 << 20),
    "max_prompt_chars": tomlconf.integer(1, 64 << 20),
    "max_messages": tomlconf.integer(1, 1024),
    "request_timeout_s": tomlconf.number(0, positive=True),
    "cache_enabled": tomlconf.boolean,
    "cache_max_entries": tomlconf.integer(1, 10_000_000),
    "cache_max_bytes": tomlconf.integer(1024, 1 << 40),
    "cache_ttl_s": tomlconf.number(0, positive=True),
    "model_aliases": _names,
    "grace_s": tomlconf.number(0),
    "access_log": tomlconf.boolean,
    "log_level": tomlconf.one_of(*LOG_LEVELS),
    "jwt": _jwt,
    "rate_limit_tiers": _tiers,
}
