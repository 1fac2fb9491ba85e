"""Reading one table of the shared TOML config file, and the value rules its loaders share: each
rule raises ConfigError with a message that starts with the key at fault."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

from edge_runtime.config import ConfigError, read_config_file

Rule = Callable[[str, Any], None]


# Every process reads its own tables from the one file, read the same way.
read_file = read_config_file


def table(data: dict[str, Any], name: str, path: Path | None, known: set[str]) -> dict[str, Any]:
    """The `[name]` table of a parsed file, refusing keys not in `known`."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {name} must be a table ([{name}])")
    for key in value:
        if key not in known:
            raise ConfigError(f"{where(path, name)} unknown key {key!r} (known: {', '.join(sorted(known))})")
    return dict(value)


def where(path: Path | None, name: str) -> str:
    return f"{path}: [{name}]" if path else f"[{name}]"


def integer(lo: int, hi: int) -> Rule:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(f"{name}: must be in [{lo}, {hi}], got {value}")

    return check


def number(lo: float, hi: float = math.inf, *, positive: bool = False) -> Rule:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        if value < lo or (positive and value <= lo) or value > hi:
            bound = f"{'>' if positive else '>='} {lo}" + ("" if hi == math.inf else f" and <= {hi}")
            raise ConfigError(f"{name}: must be {bound}, got {value}")

    return check


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: must be true or false, got {value!r}")


def text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a non-empty string, got {value!r}")


def one_of(*choices: str) -> Rule:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return check


def validate(obj: Any, rules: dict[str, Rule], optional: frozenset[str]) -> None:
    """Apply `rules` to a dataclass instance's fields (None is allowed for `optional` ones)."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is not None or name not in optional:
            rule(name, value)
