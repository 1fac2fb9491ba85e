"""The engine daemon's configuration: the `[engine]` table of the shared TOML config file
(other tables belong to the sidecar), validated with messages that name the key at fault."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, TypeVar

from .errors import EdgeRuntimeError
from .protocol import DEFAULT_MAX_FRAME

DEFAULT_CONFIG_PATH = Path("/etc/edge-runtime/config.toml")
SOCKET_NAME = "engine.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(EdgeRuntimeError):
    """The config file is unreadable, or a key is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # recipe name, built directory or checkpoint; None: the default model
    socket_path: str | None = None  # None: default_socket_path()
    max_batch: int = 8  # KV slots: sequences decoded together (KV memory grows only with the tokens held)
    max_context: int | None = None  # tokens per slot; None: the model's
    threads: int | None = None  # CPU threads; None: ONNX Runtime's choice
    queue_size: int = 64  # requests waiting for a slot before the engine answers busy
    prefill_chunk: int = 256
    prefix_cache_mb: float = 64.0  # 0: no prefix cache; sizing: docs/engine-performance.md
    prefix_block: int = 32
    # Prefixes to cache at start: raw prompt text, or {system = "..."} rendered with the chat template.
    warmup_prompts: tuple[str | dict[str, str], ...] = ()
    grace_s: float = 30.0  # how long running streams may finish after SIGTERM
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    log_level: str = "info"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in _OPTIONAL:
                _RULES[f.name](f.name, value)
        object.__setattr__(self, "warmup_prompts", tuple(self.warmup_prompts))

    def with_overrides(self, **overrides: Any) -> EngineConfig:
        """A copy with the non-None values replaced (command-line flags win over the file)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def resolved_socket_path(self) -> Path:
        return Path(self.socket_path) if self.socket_path else default_socket_path()


def default_socket_path() -> Path:
    """$RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), /run/edge-runtime under systemd, else the
    user's runtime directory, else a per-user directory in /tmp."""
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY")
    if runtime_dir:
        return Path(runtime_dir.split(":")[0]) / SOCKET_NAME
    if os.environ.get("INVOCATION_ID"):  # set by systemd for every unit it starts
        return Path("/run/edge-runtime") / SOCKET_NAME
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "edge-runtime" / SOCKET_NAME
    return Path(f"/tmp/edge-runtime-{os.getuid()}") / SOCKET_NAME


T = TypeVar("T")


def read_config_file(path: Path | None) -> tuple[dict[str, Any], Path | None]:
    """The parsed file at `path` (without one: /etc/edge-runtime/config.toml if present, else
    ({}, None)); every process reads its own tables from it."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.is_file():
            return {}, None
        path = DEFAULT_CONFIG_PATH
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8")), Path(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def table_config(data: dict[str, Any], path: Path | None, name: str, cls: type[T]) -> T:
    """The `[name]` table of a parsed config file as the dataclass `cls` (which validates its
    values); unknown keys and bad values are refused naming the file, table and key."""
    table = data.get(name, {})
    where = f"{path}: [{name}]" if path else f"[{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name} must be a table ([{name}])")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{where} unknown key {key!r} (known: {', '.join(sorted(known))})")
    try:
        return cls(**table)
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}") from None


def load_config(path: Path | None = None) -> EngineConfig:
    """The config at `path`; without one, /etc/edge-runtime/config.toml if present, else defaults."""
    data, path = read_config_file(path)
    return table_config(data, path, "engine", EngineConfig)


# ---------------------------------------------------------------------------------------------- rules


def _int(lo: int, hi: int | None = None):
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            raise ConfigError(f"{name}: must be {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}, got {value}")

    return check


def _number(lo: float):
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        if value < lo:
            raise ConfigError(f"{name}: must be >= {lo}, got {value}")

    return check


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a non-empty string, got {value!r}")


def _log_level(name: str, value: Any) -> None:
    if value not in LOG_LEVELS:
        raise ConfigError(f"{name}: must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def _warmup_prompts(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: must be a list of strings or {{system = \"...\"}} tables")
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            continue
        if isinstance(item, dict) and set(item) == {"system"} and isinstance(item["system"], str) and item["system"]:
            continue
        raise ConfigError(f"{name}[{i}]: must be a non-empty string or a {{system = \"...\"}} table, got {item!r}")


_OPTIONAL = frozenset({"model", "socket_path", "max_context", "threads"})
_RULES = {
    "model": _text,
    "socket_path": _text,
    "max_batch": _int(1, 1024),
    "max_context": _int(2),
    "threads": _int(1, 1024),
    "queue_size": _int(1),
    "prefill_chunk": _int(1),
    "prefix_cache_mb": _number(0),
    "prefix_block": _int(1, 4096),
    "warmup_prompts": _warmup_prompts,
    "grace_s": _number(0),
    "max_frame_bytes": _int(4096, 64 << 20),
    "log_level": _log_level,
}
