"""The configuration reference (docs/configuration.md) as markdown, generated from the config
models as the example config is (edge_wire/settings.py): one section per table of config.toml,
one row per key with its default, its rule in words and its description. Written by
`python -m edge_wire.settings reference docs/configuration.md`, which keeps the page's
hand-written introduction; a test fails when the page falls behind the models."""

from __future__ import annotations

import re
from types import NoneType
from typing import Any, Literal, get_args, get_origin

import msgspec

from .settings import SECRET, Check, Table, _kind, _nested, _num, _toml, arms, example_models, hints, meta, split, table_keys

_FIRST_TABLE = re.compile(r"(?m)^## `\[")


def reference(intro: str) -> str:
    """The page: `intro`, then every table of config.toml (nested tables after their parent)."""
    out = [intro.rstrip("\n"), ""]
    for name, model in example_models():
        out += _table(f"[{name}]", model, (model.__doc__ or "").strip(), "##")
    return "\n".join(out).rstrip("\n") + "\n"


def intro_of(text: str) -> str:
    """The hand-written introduction of the page: what comes before its first table."""
    return _FIRST_TABLE.split(text, maxsplit=1)[0]


def _table(header: str, model: type[Table], about: str, level: str) -> list[str]:
    lines = [f"{level} `{header}`", ""]
    if about:
        lines += [" ".join(line.strip() for line in about.splitlines()), ""]
    lines += ["| key | default | value | what |", "| --- | --- | --- | --- |"]
    nested = []
    fields = {f.name: f for f in msgspec.structs.fields(model)}
    for key in table_keys(model):
        tp = hints(model)[key]
        base, extras = split(tp)
        rule = meta(extras)
        sub = _nested(base)
        if sub is not None:
            nested.append((key, *sub, rule.description or ""))
            continue
        secret = " (secret: never printed)" if SECRET in extras else ""
        lines.append(f"| `{key}` | {_default(fields[key], rule)} | {_cell(_rule(tp))}{secret} | {_cell(rule.description or '')} |")
    lines.append("")
    name = header.strip("[]")
    for key, sub_model, form, description in nested:
        sub_header = {"table": f"[{name}.{key}]", "array": f"[[{name}.{key}]]", "map": f"[{name}.{key}.NAME]"}[form]
        lines += _table(sub_header, sub_model, description, "###")
    return lines


def _default(field: msgspec.structs.FieldInfo, rule: msgspec.Meta) -> str:
    if rule.examples:
        return f"none (e.g. `{_toml(rule.examples[0])}`)"
    value = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
    if value is msgspec.NODEFAULT:
        return "required"
    if value is None:
        return "none"
    return f"`{_toml(value)}`"


def _rule(tp: Any) -> str:
    """The value a key takes, in words: its kind and bounds, "or none" when it may be left unset."""
    base, extras = split(tp)
    members = [a for a in arms(base) if split(a)[0] is not NoneType]
    words = " or ".join(_member(a, extras) for a in members)
    checks = [e for e in extras if isinstance(e, Check)]
    return words + (" (checked)" if checks and "checked" not in words else "")


def _member(tp: Any, outer: list[Any]) -> str:
    base, extras = split(tp)
    rule = meta([*outer, *extras])
    origin = get_origin(base) or base
    if origin in (int, float) and origin is not bool:
        bounds = _bounds(rule)
        return ("an integer" if origin is int else "a number") + (f" {bounds}" if bounds else "")
    if origin in (tuple, list):
        item = get_args(base)[0] if get_args(base) else Any
        item_words = _member(item, []) if get_origin(split(item)[0]) is not Literal else _kind(item, [])
        return f"{_kind(tp, outer)}, each {item_words}"
    if origin is dict:
        return "a table of names, each " + _member(get_args(base)[1], [])
    return _kind(tp, outer)


def _bounds(rule: msgspec.Meta) -> str:
    low = f">= {_num(rule.ge)}" if rule.ge is not None else f"> {_num(rule.gt)}" if rule.gt is not None else ""
    high = f"<= {_num(rule.le)}" if rule.le is not None else f"< {_num(rule.lt)}" if rule.lt is not None else ""
    if rule.ge is not None and rule.le is not None:
        return f"in [{_num(rule.ge)}, {_num(rule.le)}]"
    return " and ".join(b for b in (low, high) if b)


def _cell(text: str) -> str:
    """Text that stays in one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
