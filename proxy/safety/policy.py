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
from typing import Annotated, Any, Literal

from msgspec import Meta

from edge_wire.settings import Check, ConfigError, Table, Text, convert, load_table, read_config_file

from .detectors import DETECTORS

ACTIONS = ("log", "redact", "block")  # in rising order of risk
DIRECTIONS = ("input", "output", "both")
MAX_TERM_CHARS = 256
_PII_REPLACEMENTS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "national_id": "[NATIONAL_ID]"}
Action = Literal[ACTIONS]  # type: ignore[valid-type]
Detector = Literal[tuple(DETECTORS)]  # type: ignore[valid-type]


def _not_blank(key: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(f"{key}: must not be blank")


def _regex(key: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{key}: invalid regular expression ({exc})") from None


Term = Annotated[str, Meta(min_length=1, max_length=MAX_TERM_CHARS), Check(_not_blank)]


class CategoryTable(Table):
    """A category of prompts or outputs to act on (any name)."""

    action: Annotated[Action, Meta(description="block | redact | log: the most this category does")] = "block"
    direction: Annotated[Literal[DIRECTIONS], Meta(description="input | output | both")] = "both"  # type: ignore[valid-type]
    terms: Annotated[tuple[Term, ...], Meta(
        description="matched as words after normalization (width, case, homoglyphs)", examples=[["pipe bomb"]])] = ()
    patterns: Annotated[tuple[Annotated[Term, Check(_regex)], ...], Meta(
        description="regular expressions, on normalized text")] = ()
    replacement: Annotated[str, Meta(max_length=MAX_TERM_CHARS, description="what redaction writes")] = "[REDACTED]"

    def check(self) -> None:
        if not self.terms and not self.patterns:
            raise ConfigError("needs terms or patterns")


class PolicyTable(Table):
    """The categories of a policy: in the config file's [safety] table or in a policy file."""

    categories: Annotated[dict[str, CategoryTable], Meta(description="terms and patterns to act on, by category (any name)")] = {}
    pii: Annotated[dict[Detector, Action], Meta(
        description=f"built-in detectors ({', '.join(DETECTORS)}) = action", examples=[{"email": "redact"}])] = {}


class SafetyTable(PolicyTable):
    """The safety filter on prompts and outputs (docs/tool-calling.md, "Safety filter")."""

    enabled: Annotated[bool, Meta(description="screen prompts and outputs (when categories are set)")] = True
    hold_back_chars: Annotated[int, Meta(ge=1, le=4096, description="streamed output held back to catch phrases split across chunks")] = 64
    policy_file: Annotated[Text | None, Meta(
        description="categories and pii from this file instead (reloaded on change or SIGHUP)",
        examples=["/etc/edge-runtime/safety.toml"], extra={"alternative": True})] = None


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
    """The policy in force, resolved from a SafetyTable (and its policy file)."""

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
    return _resolve(load_table(SafetyTable, {"safety": table}, "safety", source), source)


def read_policy_file(path: Path) -> tuple[Category, ...]:
    """The categories of a policy file: its `[safety]` table's `categories` and `pii`, or the
    same keys at its top level."""
    data, path = read_config_file(path)
    if "safety" in data:
        return _categories(load_table(PolicyTable, data, "safety", path))
    try:
        return _categories(convert(PolicyTable, data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load(data: dict[str, Any], source: Path | None) -> SafetyConfig:
    """The safety policy of a parsed config file (none configured: an inactive policy)."""
    return from_table(data.get("safety", {}), source)


def reload(config: SafetyConfig) -> SafetyConfig:
    """The policy read again from where `config` came from."""
    if config.source is not None:
        return load(read_config_file(config.source)[0], config.source)
    if config.policy_file is not None:
        return SafetyConfig(config.enabled, config.hold_back_chars, read_policy_file(config.policy_file), config.policy_file)
    return config


def _resolve(table: SafetyTable, source: Path | None) -> SafetyConfig:
    if table.policy_file is None:
        return SafetyConfig(table.enabled, table.hold_back_chars, _categories(table), None, source)
    path = Path(table.policy_file) if source is None else source.parent / table.policy_file
    return SafetyConfig(table.enabled, table.hold_back_chars, read_policy_file(path), path, source)


def _categories(table: PolicyTable) -> tuple[Category, ...]:
    named = [Category(name, c.action, c.direction, c.terms, c.patterns, None, c.replacement) for name, c in table.categories.items()]
    pii = [Category(f"pii_{detector}", action, detector=detector, replacement=_PII_REPLACEMENTS[detector])
           for detector, action in table.pii.items()]
    return (*named, *pii)
