"""The safety policy: the `[safety]` table of the config file, or the policy file it names,
validated with messages that name the key at fault.

    [safety]
    hold_back_chars = 64                 # streamed output held back to catch phrases split across chunks
    policy_file = "/etc/edge-runtime/safety.toml"   # optional: categories and pii from there (reloaded)

    [safety.categories.weapons]          # any name
    action = "block"                     # block | redact | log: the most this category does
    direction = "both"                   # input | output | both
    terms = ["pipe bomb"]                # matched as words after normalization (width, case, homoglyphs)
    patterns = ['nerve\\s+agents?']       # regular expressions, on normalized text
    replacement = "[REDACTED]"           # what redaction writes

    [safety.pii]                         # built-in detectors: email, phone, card, national_id
    email = "redact"
    card = "block"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from edge_runtime.config import ConfigError

from .detectors import DETECTORS

ACTIONS = ("log", "redact", "block")  # in rising order of risk
DIRECTIONS = ("input", "output", "both")
MAX_TERM_CHARS = 256
_PII_REPLACEMENTS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "national_id": "[NATIONAL_ID]"}
_TABLE_KEYS = {"hold_back_chars", "policy_file", "categories", "pii", "enabled"}
_CATEGORY_KEYS = {"action", "direction", "terms", "patterns", "replacement"}


@dataclass(frozen=True)
class Category:
    name: str
    action: str  # one of ACTIONS
    direction: str = "both"
    terms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    detector: str | None = None  # a PII detector (proxy/safety/detectors.py)
    replacement: str = "[REDACTED]"

    def applies(self, direction: str) -> bool:
        return self.direction in ("both", direction)


@dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True
    hold_back_chars: int = 64
    categories: tuple[Category, ...] = ()
    policy_file: Path | None = None  # where the categories come from, when not from the config file
    source: Path | None = None  # the file this was read from (reloaded on change or SIGHUP)

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.categories)


def from_table(table: Any, source: Path | None) -> SafetyConfig:
    """A `[safety]` table; with `policy_file`, the categories and pii come from that file."""
    where = f"{source}: [safety]" if source else "[safety]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    _known(table, _TABLE_KEYS, where)
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where} enabled: must be true or false")
    hold = table.get("hold_back_chars", 64)
    if isinstance(hold, bool) or not isinstance(hold, int) or not 1 <= hold <= 4096:
        raise ConfigError(f"{where} hold_back_chars: must be an integer in [1, 4096], got {hold!r}")
    policy_file = table.get("policy_file")
    if policy_file is not None:
        if not isinstance(policy_file, str) or not policy_file:
            raise ConfigError(f"{where} policy_file: must be a path")
        path = Path(policy_file) if source is None else source.parent / policy_file
        return SafetyConfig(enabled, hold, read_policy_file(path), path, source)
    return SafetyConfig(enabled, hold, _categories(table, where), None, source)


def read_policy_file(path: Path) -> tuple[Category, ...]:
    """The categories of a policy file: its `[safety]` table's `categories` and `pii`, or the
    same keys at its top level."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read safety policy ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    table = data.get("safety", data)
    where = f"{path}: [safety]" if "safety" in data else f"{path}:"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    _known(table, {"categories", "pii"}, where)
    return _categories(table, where)


def load(data: dict[str, Any], source: Path | None) -> SafetyConfig:
    """The safety policy of a parsed config file (none configured: an inactive policy)."""
    return from_table(data.get("safety", {}), source)


def reload(config: SafetyConfig) -> SafetyConfig:
    """The policy read again from where `config` came from."""
    if config.source is not None:
        try:
            data = tomllib.loads(config.source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config.source}: cannot read config ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config.source}: invalid TOML ({exc})") from None
        return load(data, config.source)
    if config.policy_file is not None:
        return SafetyConfig(config.enabled, config.hold_back_chars, read_policy_file(config.policy_file), config.policy_file)
    return config


def _known(table: dict[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where} unknown key {key!r} (known: {', '.join(sorted(known))})")


def _categories(table: dict[str, Any], where: str) -> tuple[Category, ...]:
    out: list[Category] = []
    categories = table.get("categories", {})
    if not isinstance(categories, dict):
        raise ConfigError(f"{where} categories: must be a table of categories ([safety.categories.NAME])")
    for name, spec in categories.items():
        out.append(_category(name, spec, f"{where} categories.{name}"))
    pii = table.get("pii", {})
    if not isinstance(pii, dict):
        raise ConfigError(f"{where} pii: must be a table of detector = action")
    for detector, action in pii.items():
        if detector not in DETECTORS:
            raise ConfigError(f"{where} pii.{detector}: unknown detector (known: {', '.join(DETECTORS)})")
        if action not in ACTIONS:
            raise ConfigError(f"{where} pii.{detector}: must be one of {', '.join(ACTIONS)}, got {action!r}")
        out.append(Category(f"pii_{detector}", action, detector=detector, replacement=_PII_REPLACEMENTS[detector]))
    return tuple(out)


def _category(name: str, spec: Any, where: str) -> Category:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    _known(spec, _CATEGORY_KEYS, where)
    action = spec.get("action", "block")
    if action not in ACTIONS:
        raise ConfigError(f"{where}.action: must be one of {', '.join(ACTIONS)}, got {action!r}")
    direction = spec.get("direction", "both")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction: must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    terms = _strings(spec.get("terms", []), f"{where}.terms")
    patterns = _strings(spec.get("patterns", []), f"{where}.patterns")
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}.patterns[{i}]: invalid regular expression ({exc})") from None
    if not terms and not patterns:
        raise ConfigError(f"{where}: needs terms or patterns")
    replacement = spec.get("replacement", "[REDACTED]")
    if not isinstance(replacement, str):
        raise ConfigError(f"{where}.replacement: must be a string")
    return Category(name, action, direction, terms, patterns, None, replacement)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip() or len(item) > MAX_TERM_CHARS:
            raise ConfigError(f"{where}[{i}]: must be a non-empty string of at most {MAX_TERM_CHARS} characters")
    return tuple(value)
