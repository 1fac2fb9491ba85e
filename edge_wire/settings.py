"""The config convention, one for every table of config.toml and for pushed fleet documents.

A table is a `Table`: a frozen msgspec.Struct that refuses unknown keys, whose every field carries
its rule in its type (`Annotated[T, Meta(ge=, le=, min_length=, ...)]`, a `Literal[...]`, a
`bool`, a nested Table, or a `Check` for what Meta cannot say: a URL, a digest, a path) and a
description (the comment in the example config, `python -m edge_wire.settings example FILE`).
`load_table` turns a parsed table into its model and every refusal into a ConfigError naming the
key (`port: must be in [0, 65535], got 70000`), with the bounds read from the model's own type
info, so each rule is stated once. Values of fields marked SECRET are never printed."""

from __future__ import annotations

import contextvars
import importlib
import json
import math
import re
import sys
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

DEFAULT_CONFIG_PATH = Path("/etc/edge-runtime/config.toml")
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
Text = Annotated[str, msgspec.Meta(min_length=1)]  # a non-empty string (Meta bounds go inside an Optional)

T = TypeVar("T", bound="Table")


class ConfigError(ValueError):
    """The config file is unreadable, or a key is unknown, of the wrong type or out of range. A
    ValueError so that msgspec reports one raised by a nested table's check with its path."""


@dataclass(frozen=True)
class Check:
    """A rule msgspec.Meta cannot state: `fn(key, value)` raises ConfigError("key: why")."""

    fn: Callable[[str, Any], object]


@dataclass(frozen=True)
class FromTable:
    """A field the loader fills from the `[name]` table (its rules: `model`), not a key of this one."""

    name: str
    model: type


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SECRET = _Marker("SECRET")  # in a field's Annotated: its value never appears in repr, str or errors
_MASKED = _Marker("'***'")
_MISSING = _Marker("<missing>")
_converting = contextvars.ContextVar("_converting", default=False)


class Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every config table. Built by `load_table`, or directly (tests, `with_overrides`,
    msgspec.structs.replace): a directly built one goes through the loader's validation too, so
    every rule holds however a table was made."""

    def __post_init__(self) -> None:
        if _converting.get():
            _run_checks(self)
            self.check()
            return
        valid = convert(type(self), msgspec.structs.asdict(self))
        for name in self.__struct_fields__:  # the converted values: tuples for lists, tables for dicts
            msgspec.structs.force_setattr(self, name, getattr(valid, name))

    def check(self) -> None:
        """Rules that tie fields together; raise ConfigError("key: why")."""

    def with_overrides(self: T, **overrides: Any) -> T:
        """A copy with the non-None values replaced (command-line flags win over the file)."""
        return msgspec.structs.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__rich_repr__())})"

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        secret = _secrets(type(self))
        for name in self.__struct_fields__:
            value = getattr(self, name)
            yield name, _MASKED if name in secret and value else value


def convert(model: type[T], data: Any) -> T:
    """`data` (a parsed table) as `model`, or ConfigError("key: why") for the first fault."""
    token = _converting.set(True)
    try:
        return msgspec.convert(data, model, strict=True)
    except msgspec.ValidationError as exc:
        raise _explain(exc, model, data) from None
    finally:
        _converting.reset(token)


def load_table(model: type[T], data: Mapping[str, Any], name: str, path: Path | None, **loaded: Any) -> T:
    """The `[name]` table of a parsed config file as `model`, with `loaded` (values the loader
    takes from elsewhere: the environment, other tables) laid over it; errors name file, table, key."""
    table = data.get(name, {})
    where = f"{path}: [{name}]" if path else f"[{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name} must be a table ([{name}])" if path else f"{name} must be a table ([{name}])")
    keys = table_keys(model)
    for key in table:
        if key not in keys:  # FromTable fields too: they are not keys of this table
            raise ConfigError(f"{where} unknown key {key!r} (known: {', '.join(sorted(keys))})")
    try:
        return convert(model, {**table, **loaded})
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}") from None


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


# ---------------------------------------------------------------------------------------------- type info


@cache
def hints(model: type) -> dict[str, Any]:
    """Field name -> its declared type (Annotated kept), in declaration order."""
    found = typing.get_type_hints(model, include_extras=True)
    return {name: found[name] for name in model.__struct_fields__}


def split(tp: Any) -> tuple[Any, list[Any]]:
    """(the type without Annotated, its annotations: Meta, Check, SECRET, FromTable)."""
    extras: list[Any] = []
    if get_origin(tp) is Annotated:
        tp, *extras = get_args(tp)
    return tp, extras


def arms(tp: Any) -> tuple[Any, ...]:
    """The members of a union (tp itself when it is none)."""
    return get_args(tp) if get_origin(tp) in (Union, UnionType) else (tp,)


_META_ATTRS = ("gt", "ge", "lt", "le", "multiple_of", "pattern", "min_length", "max_length", "description", "examples", "extra")


def meta(extras: list[Any]) -> msgspec.Meta:
    """The field's Metas in one (a type may carry several: a bound inside, a description outside)."""
    metas = [e for e in extras if isinstance(e, msgspec.Meta)]
    merged = {a: next((getattr(m, a) for m in metas if getattr(m, a) is not None), None) for a in _META_ATTRS}
    return msgspec.Meta(**{a: v for a, v in merged.items() if v is not None})


@cache
def table_keys(model: type) -> tuple[str, ...]:
    """The keys a table of `model` may hold: its fields but those the loader fills from elsewhere."""
    return tuple(n for n, tp in hints(model).items() if not any(isinstance(e, FromTable) for e in split(tp)[1]))


@cache
def _secrets(model: type) -> frozenset[str]:
    return frozenset(n for n, tp in hints(model).items() if SECRET in split(tp)[1])


def _shape(tp: Any) -> tuple[type, ...]:
    """The Python types a value of `tp` has in a parsed table."""
    base = split(tp)[0]
    origin = get_origin(base) or base
    if origin is Literal:
        return tuple({type(choice) for choice in get_args(base)})
    if origin in (tuple, list):
        return (tuple, list)
    if origin is float:
        return (float, int)
    return (origin,) if isinstance(origin, type) else (object,)


def _arm_for(tp: Any, value: Any) -> Any:
    """The member of a union that `value` has the shape of (the only non-None one when none fits)."""
    members = arms(split(tp)[0])
    if len(members) == 1:
        return tp
    for arm in members:
        shape = _shape(arm)
        if isinstance(value, shape) and not (isinstance(value, bool) and bool not in shape):
            return arm
    real = [a for a in members if split(a)[0] is not NoneType]
    return real[0] if len(real) == 1 else tp


# ---------------------------------------------------------------------------------------------- checks


def _run_checks(table: Table) -> None:
    for name, tp in hints(type(table)).items():
        _check(name, getattr(table, name), tp)


def _check(key: str, value: Any, tp: Any) -> None:
    """The declared Checks of `tp` on `value` (when present) and on its items, and finite numbers."""
    if value is None:
        return
    base, extras = split(tp)
    for extra in extras:
        if isinstance(extra, Check):
            extra.fn(key, value)
    arm = _arm_for(base, value)
    if arm is not base:
        _check(key, value, arm)
        return
    origin = get_origin(base) or base
    if origin is float and not math.isfinite(value):  # Meta bounds let inf through
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if origin in (tuple, list):
        for i, item in enumerate(value):
            _check(f"{key}[{i}]", item, get_args(base)[0])
    elif origin is dict:
        for name, item in value.items():
            _check(f"{key}.{name}", item, get_args(base)[1])


# ---------------------------------------------------------------------------------------------- messages

_AT = re.compile(r" - at (`key` in )?`\$([^`]*)`$")
_STEP = re.compile(r"\.(\w+)|\[(\d+|\.\.\.)\]")


def _explain(exc: msgspec.ValidationError, model: type, data: Any) -> ConfigError:
    """msgspec's "Expected `int` <= 65535 - at `$.port`" as "port: must be in [0, 65535], got 70000",
    found by following the path through the model's types and the data together."""
    text = str(exc)
    at = _AT.search(text)
    message = text[: at.start()] if at else text
    steps = _STEP.findall(at.group(2)) if at else []
    if at and at.group(1):  # "at `key` in `$.x`": one of the mapping's keys is at fault
        steps.append(("", "..."))
    tp, value, key, secret, bad_name = model, data, "", False, False
    for name, index in steps:
        base, extras = split(tp)
        secret = secret or SECRET in extras
        base = split(_arm_for(base, value))[0]
        if name:
            tp = hints(base)[name]
            value = value.get(name, _MISSING) if isinstance(value, Mapping) else getattr(value, name, _MISSING)
            key = f"{key}.{name}" if key else name
        elif index == "...":
            key_type, item_type = get_args(base)
            entry, bad_name = _bad_entry(value, key_type, item_type)
            key = f"{key}.{entry}"
            tp, value = (key_type, entry) if bad_name else (item_type, value[entry])
        else:
            i = int(index)
            tp = get_args(base)[0]
            value = value[i] if isinstance(value, (list, tuple)) and i < len(value) else _MISSING
            key = f"{key}[{i}]"
    base, extras = split(tp)
    base, arm_extras = split(_arm_for(base, value))
    extras = [*extras, *arm_extras]
    secret = secret or SECRET in extras
    if isinstance(exc.__cause__, ConfigError):  # a Check or a table's own check, inside the table at `key`
        why = str(exc.__cause__)
        first = re.match(r"\w+", why)
        if not key:
            return ConfigError(why)
        fields = base.__struct_fields__ if isinstance(base, type) and issubclass(base, Table) else ()
        return ConfigError(f"{key}.{why}" if first and first.group() in fields else f"{key}: {why}")
    if unknown := re.match(r"Object contains unknown field `(.*)`", message):
        why = f"unknown key {unknown.group(1)!r} (known: {', '.join(sorted(table_keys(base)))})"
    elif missing := re.match(r"Object missing required field `(.*)`", message):
        return ConfigError(f"{key + '.' if key else ''}{missing.group(1)}: required")
    elif bad_name:
        why = f"unknown name (known: {', '.join(get_args(base))})"
    else:
        why = _phrase(base, extras, value, secret)
    return ConfigError(f"{key}: {why}" if key else why)


def _bad_entry(mapping: Mapping[Any, Any], key_type: Any, item_type: Any) -> tuple[Any, bool]:
    """The first (name, whether the name itself is at fault) of a mapping that does not convert."""
    for name, item in mapping.items():
        for part, tp in ((name, key_type), (item, item_type)):
            try:
                msgspec.convert(part, tp, strict=True)
            except (msgspec.ValidationError, ConfigError):
                return name, part is name
    return "...", False


def _phrase(base: Any, extras: list[Any], value: Any, secret: bool) -> str:
    got = "" if secret or value is _MISSING else f", got {value!r}"
    members = [a for a in arms(base) if split(a)[0] is not NoneType]
    if len(members) > 1:
        return f"must be {' or '.join(_kind(a, []) for a in members)}{got}"
    tp = Annotated[(members[0], *extras)] if extras else members[0]
    info = msgspec.inspect.type_info(tp)
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        is_int = isinstance(info, msgspec.inspect.IntType)
        number = isinstance(value, int if is_int else (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value):
            return f"must be {_bounds(info, is_int)}{got}"
    return f"must be {_kind(members[0], extras)}{got}"


def _kind(tp: Any, extras: list[Any]) -> str:
    """What a value of `tp` is, in words ("a non-empty string of at most 256 characters")."""
    base, more = split(tp)
    rule = meta([*extras, *more])
    origin = get_origin(base) or base
    if origin is Literal:
        return f"one of {', '.join(map(repr, get_args(base)))}"
    if origin is bool:
        return "true or false"
    if origin is int:
        return "an integer"
    if origin is float:
        return "a number"
    if origin is str:
        words = "a non-empty string" if rule.min_length else "a string"
        return words + (f" of at most {rule.max_length} characters" if rule.max_length else "")
    if origin in (tuple, list):
        return "a non-empty list" if rule.min_length else "a list"
    return "a non-empty table" if rule.min_length else "a table"


def _bounds(info: Any, is_int: bool) -> str:
    lo, lo_sign = (info.ge, ">=") if info.ge is not None else (info.gt, ">")
    if lo is not None and info.le is not None:
        if lo_sign == ">=":
            return f"{'' if is_int else 'a number '}in [{_num(lo)}, {_num(info.le)}]"
        return f"> {_num(lo)} and <= {_num(info.le)}"
    if lo is not None:
        return f"{lo_sign} {_num(lo)}"
    return f"<= {_num(info.le)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# ---------------------------------------------------------------------------------------------- example config

# Every table of config.toml, in the example's order (imported only to write the example).
EXAMPLE_TABLES = (
    ("engine", "edge_runtime.config:EngineConfig"),
    ("proxy", "proxy.config:ProxyConfig"),
    ("safety", "proxy.safety.policy:SafetyTable"),
    ("tracing", "edge_runtime.tracing:TracingConfig"),
    ("mqtt", "proxy.mqtt.config:MqttConfig"),
    ("fleet", "proxy.fleet.config:FleetConfig"),
    ("offload", "proxy.offload.config:OffloadConfig"),
    ("devices", "proxy.offload.config:DevicesConfig"),
    ("cloud", "proxy.offload.config:CloudConfig"),
)
_COMMENT_COLUMN = 36


def example_models() -> list[tuple[str, type[Table]]]:
    found = []
    for name, ref in EXAMPLE_TABLES:
        module, _, attr = ref.partition(":")
        found.append((name, getattr(importlib.import_module(module), attr)))
    return found


def example(intro: str) -> str:
    """The annotated example config: `intro`, then every key of every table commented out, at its
    default or at its example value ("e.g.") with its description."""
    lines = [intro.rstrip("\n"), ""]
    for name, model in example_models():
        lines += [*_table_lines(f"[{name}]", model, "# ", ""), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def intro_of(text: str) -> str:
    """The hand-written introduction of an example config: what comes before its first table."""
    return re.split(r"(?m)^# \[\w+\]$", text, maxsplit=1)[0]


def _table_lines(header: str, model: type[Table], prefix: str, note: str) -> list[str]:
    """A table's lines; a nested one is indented, so that uncommenting `# key = ...` lines gives
    a valid file, and is noted by its field's description (a top-level one by its docstring)."""
    lines = [_commented(f"{prefix}{header}", note)]
    if not note:
        lines += [f"{prefix}{line.strip()}".rstrip() for line in (model.__doc__ or "").strip().splitlines()]
    nested = []
    defaults = {f.name: f for f in msgspec.structs.fields(model)}
    for key in table_keys(model):
        base, extras = split(hints(model)[key])
        rule = meta(extras)
        sub = _nested(base)
        if sub is not None:
            nested.append((key, *sub, rule.description or ""))
            continue
        field = defaults[key]
        example_value = bool(rule.examples)
        if example_value:
            value = rule.examples[0]
        else:
            value = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
        indent = "#   " if rule.extra and rule.extra.get("alternative") else prefix
        lines.append(_commented(f"{indent}{key} = {_toml(value)}", ("e.g.; " if example_value else "") + (rule.description or "")))
    for key, sub_model, form, description in nested:
        name = header.strip("[]")
        sub_header = {"table": f"[{name}.{key}]", "array": f"[[{name}.{key}]]", "map": f"[{name}.{key}.NAME]"}[form]
        lines += _table_lines(sub_header, sub_model, "#   ", description)
    return lines


def _nested(tp: Any) -> tuple[type[Table], str] | None:
    """(model, form) for a field that is a table of its own: a table, an array of tables, or a
    map of named tables."""
    base = split(next(a for a in arms(tp) if a is not NoneType))[0]
    origin, args = get_origin(base) or base, get_args(base)
    if isinstance(origin, type) and issubclass(origin, Table):
        return origin, "table"
    if origin in (tuple, list) and isinstance(split(args[0])[0], type) and issubclass(split(args[0])[0], Table):
        return split(args[0])[0], "array"
    if origin is dict and isinstance(split(args[1])[0], type) and issubclass(split(args[1])[0], Table):
        return split(args[1])[0], "map"
    return None


def _commented(line: str, note: str) -> str:
    return f"{line.ljust(_COMMENT_COLUMN - 1)} # {note}" if note else line


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(_toml, value))}]"
    if isinstance(value, dict):
        return f"{{ {', '.join(f'{k} = {_toml(v)}' for k, v in value.items())} }}" if value else "{}"
    raise TypeError(f"no TOML form for {value!r} (a key without a default needs Meta(examples=[...]))")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("example", "reference"):
        print("usage: python -m edge_wire.settings example FILE     (the example config.toml)\n"
              "       python -m edge_wire.settings reference FILE   (the markdown reference, docs/configuration.md)\n"
              "rewrites FILE, keeping its introduction", file=sys.stderr)
        return 2
    path = Path(argv[1])
    text = path.read_text(encoding="utf-8")
    if argv[0] == "reference":
        from .config_reference import intro_of as reference_intro, reference

        path.write_text(reference(reference_intro(text)), encoding="utf-8")
    else:
        path.write_text(example(intro_of(text)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    # The models import edge_wire.settings, not this __main__ copy: run that module's code.
    from edge_wire.settings import main as settings_main

    sys.exit(settings_main(sys.argv[1:]))
