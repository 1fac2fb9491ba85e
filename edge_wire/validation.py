"""msgspec's validation errors as (path, phrase) problems that a protocol can state in its own
error form. Bounds are read from the type the value failed against, so a rule is written once:
in the schema's Meta."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import inspect as mi

_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")
# A struct's own checks (__post_init__) raise ValueError("field: phrase").
_FIELD_CHECK = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.]*): (?P<phrase>.+)$", re.S)
_EXPECTED = re.compile(r"^Expected `(?P<expected>[^`]*)`(?:, got `(?P<got>[^`]*)`)?")

UNKNOWN_FIELD = "unknown_field"
MISSING_FIELD = "missing_field"
BAD_VALUE = "bad_value"

_TYPE_NAMES = {
    mi.IntType: "an integer", mi.FloatType: "a number", mi.StrType: "a string", mi.BoolType: "true or false",
    mi.ListType: "an array", mi.DictType: "an object", mi.StructType: "an object", mi.NoneType: "null",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong, where: `path` is dotted (`params.temperature`, `messages[0].role`, "" for
    the whole document), `phrase` completes "<path> ..." (`must be in [0, 2], got 3`)."""

    kind: str  # UNKNOWN_FIELD, MISSING_FIELD or BAD_VALUE
    path: str
    phrase: str
    out_of_bounds: bool = False  # a value of the right type that broke a bound (not a type mismatch)
    extra: Mapping[str, Any] = field(default_factory=dict)  # the failing field's Meta(extra=...)

    def message(self, sep: str = " ") -> str:
        return f"{self.path}{sep}{self.phrase}" if self.path else self.phrase


def explain(exc: msgspec.ValidationError, schema: Any, value: Any) -> Problem:
    """The problem `exc` reports for `value` converted to `schema`."""
    match = _AT.match(str(exc))
    what, steps = match["what"], _steps(match["path"] or "$")
    if (m := _UNKNOWN.match(what)) is not None:
        return Problem(UNKNOWN_FIELD, _join(steps + [m["name"]]), "is not a known field")
    if (m := _MISSING.match(what)) is not None:
        return Problem(MISSING_FIELD, _join(steps + [m["name"]]), "is required")
    kind, extra = _type_at(mi.type_info(schema), steps)
    if isinstance(kind, mi.StructType) and (named := _FIELD_CHECK.match(what)) is not None \
            and any(f.encode_name == named["name"].split(".")[0] for f in kind.fields):
        return Problem(BAD_VALUE, _join(steps + named["name"].split(".")), named["phrase"])  # a check in __post_init__
    got = _value_at(value, steps)
    phrase = _rule(kind, got) if kind is not None else None
    if phrase is None:
        phrase = _from_message(what, got)
    return Problem(BAD_VALUE, _join(_trim(kind, steps)), phrase, _of_type(kind, got), extra)


def _steps(path: str) -> list[str | int]:
    return [int(i) if i else name for name, i in _STEP.findall(path[1:]) if name or i]


def _join(steps: list[str | int]) -> str:
    out = ""
    for step in steps:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def _unwrap(kind: Any, extra: dict[str, Any] | None = None) -> Any:
    """The type itself, without its Metadata (whose `extra` is gathered into `extra`), and the one
    non-null member of an optional type."""
    while isinstance(kind, mi.Metadata):
        if extra is not None and kind.extra:
            extra.update(kind.extra)
        kind = kind.type
    if isinstance(kind, mi.UnionType):
        members = [t for t in kind.types if not isinstance(t, mi.NoneType)]
        if len(members) == 1:
            return _unwrap(members[0], extra)
    return kind


def _type_at(kind: Any, steps: list[str | int]) -> tuple[Any, dict[str, Any]]:
    """The type at `steps` inside `kind`, and the Meta extra of that last step."""
    extra: dict[str, Any] = {}
    for step in steps:
        kind = _unwrap(kind)
        if isinstance(step, int) and isinstance(kind, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            kind = kind.item_type
        elif isinstance(step, str) and isinstance(kind, mi.StructType):
            kind = next((f.type for f in kind.fields if f.encode_name == step), None)
        elif isinstance(step, str) and isinstance(kind, mi.DictType):
            kind = kind.value_type
        else:
            return None, {}
        if kind is None:
            return None, {}
    return _unwrap(kind, extra), extra


def _trim(kind: Any, steps: list[str | int]) -> list[str | int]:
    """A failing item of a list of scalars is reported as the list (`stop`, not `stop[3]`)."""
    if steps and isinstance(steps[-1], int) and not isinstance(kind, (mi.StructType, mi.DictType, mi.UnionType)):
        return steps[:-1]
    return steps


_PYTHON_TYPES: dict[type, tuple[type, ...]] = {
    mi.IntType: (int,), mi.FloatType: (int, float), mi.StrType: (str,), mi.ListType: (list,), mi.DictType: (dict,),
}


def _of_type(kind: Any, got: Any) -> bool:
    """Whether `got` has the type `kind` wants (so what it broke was a bound)."""
    wanted = _PYTHON_TYPES.get(type(kind))
    return wanted is not None and isinstance(got, wanted) and not isinstance(got, bool)


def _value_at(value: Any, steps: list[str | int]) -> Any:
    for step in steps:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return _NOTHING
    return value


_NOTHING = object()


def _got(value: Any) -> str:
    if value is _NOTHING:
        return ""
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
    return f", got {text[:64]}"


def _bounds(kind: Any) -> tuple[Any, Any, bool, bool]:
    lo, lo_open = (kind.gt, True) if getattr(kind, "gt", None) is not None else (getattr(kind, "ge", None), False)
    hi, hi_open = (kind.lt, True) if getattr(kind, "lt", None) is not None else (getattr(kind, "le", None), False)
    return lo, hi, lo_open, hi_open


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _rule(kind: Any, got: Any) -> str | None:
    """The phrase for a value that broke `kind`'s rule (type or bound)."""
    if isinstance(kind, mi.LiteralType):
        return f"must be one of {', '.join(repr(v) for v in kind.values)}{_got(got)}"
    if isinstance(kind, (mi.IntType, mi.FloatType)):
        wrong_type = isinstance(got, bool) or not isinstance(got, (int, float)) or (
            isinstance(kind, mi.IntType) and not isinstance(got, int))
        if wrong_type:
            return f"must be {_TYPE_NAMES[type(kind)]}{_got(got)}"
        lo, hi, lo_open, hi_open = _bounds(kind)
        if lo is not None and hi is not None:
            return f"must be in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}{_got(got)}"
        if lo is not None:
            return f"must be {'>' if lo_open else '>='} {_num(lo)}{_got(got)}"
        if hi is not None:
            return f"must be {'<' if hi_open else '<='} {_num(hi)}{_got(got)}"
        return f"must be a finite number{_got(got)}"
    if isinstance(kind, mi.StrType):
        if not isinstance(got, str):
            return f"must be a string{_got(got)}"
        if kind.min_length and len(got) < kind.min_length:
            return "must be a non-empty string" if kind.min_length == 1 else f"must be at least {kind.min_length} characters long"
        if kind.max_length is not None and len(got) > kind.max_length:
            return f"must be at most {kind.max_length} characters long"
        if kind.pattern is not None:
            return f"must match {kind.pattern}{_got(got)}"
        return None
    if isinstance(kind, (mi.ListType, mi.DictType)):
        if not isinstance(got, list if isinstance(kind, mi.ListType) else dict):
            return f"must be {_TYPE_NAMES[type(kind)]}"
        if kind.min_length and len(got) < kind.min_length:
            return "must not be empty" if kind.min_length == 1 else f"must hold at least {kind.min_length} items"
        if kind.max_length is not None and len(got) > kind.max_length:
            return f"must hold at most {kind.max_length} items, got {len(got)}"
        return None
    if isinstance(kind, mi.StructType):
        return None if isinstance(got, dict) else "must be an object"
    if type(kind) in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[type(kind)]}{_got(got)}"
    return None


def _from_message(what: str, got: Any) -> str:
    """A phrase from msgspec's own text, for rules the type info cannot restate."""
    m = _EXPECTED.match(what)
    if m is not None:
        return f"must be {m['expected']}" + _got(got)
    return what[0].lower() + what[1:] if what else "is invalid"
