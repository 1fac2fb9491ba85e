"""OpenAI's tool calling and structured output, in the engine's terms: `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` of a chat request become the engine's `tools` and
`grammar` fields (proxy/core/tool_calls.py turns the engine's deltas back into OpenAI's shape)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional

import msgspec
from msgspec import Meta

from ..core.errors import invalid, unsupported
from ..core.request import Structured

MAX_TOOLS = 128  # the engine's limit
_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}\Z"  # \Z: Python's $ would let a trailing newline through
_NAME = re.compile(_NAME_PATTERN).match
_SCHEMA_KEYS = frozenset({"name", "description", "schema", "strict"})

FunctionName = Annotated[str, Meta(pattern=_NAME_PATTERN, description="1 to 64 of a-z, A-Z, 0-9, _ and -",
                                   extra_json_schema={"pattern": "^[A-Za-z0-9_-]{1,64}$"})]  # the same, as ECMA-262 says it


class Function(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: FunctionName
    description: Optional[str] = None
    parameters: Optional[Annotated[dict[str, Any], Meta(description="a JSON schema of type object")]] = None
    strict: Optional[bool] = None


class Tool(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Annotated[str, Meta(extra_json_schema={"const": "function"})]
    function: Optional[Function] = None


def parse_structured(tools: list[Tool] | None, tool_choice: str | dict[str, Any] | None, parallel: bool | None,
                     response_format: dict[str, Any] | None) -> Structured:
    """Check tools, tool_choice, parallel_tool_calls and response_format together (400 naming the
    parameter at fault); what the engine cannot do is refused, never ignored."""
    engine_tools = _tools(tools)
    choice = _tool_choice(tool_choice, engine_tools)
    grammar = _response_format(response_format)
    if engine_tools and choice != "none":
        if grammar is not None:
            raise unsupported("response_format", "response_format together with tools is not supported (unless tool_choice is 'none')")
        grammar = {"type": "tool_calls", "mode": "auto" if choice == "auto" else "required", "parallel": parallel is not False}
        if isinstance(choice, dict):
            grammar["names"] = [choice["function"]["name"]]
    return Structured(engine_tools, grammar)


def _tools(value: list[Tool] | None) -> list[dict[str, Any]] | None:
    if not value:
        return None
    if len(value) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools")
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise unsupported(f"{where}.type", f"{where}: {tool.type!r} tools are not supported (only 'function')")
        function = tool.function
        if function is None:
            raise invalid(f"{where}.function", f"{where}.function is required", code="missing_required_parameter")
        if function.name in names:
            raise invalid(f"{where}.function.name", f"duplicate function name {function.name!r}")
        names.add(function.name)
        entry: dict[str, Any] = {"name": function.name}
        if function.description is not None:
            entry["description"] = function.description
        if function.parameters is not None:
            if function.parameters.get("type", "object") != "object":
                raise invalid(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON schema of type object")
            entry["parameters"] = function.parameters
        out.append({"type": "function", "function": entry})
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value != "none" and not tools:
            raise invalid("tool_choice", f"tool_choice {value!r} needs tools")
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise invalid("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        return value
    raise invalid("tool_choice", "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None or value == {"type": "text"}:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format", "response_format must be an object with a type")
    kind = value["type"]
    if kind == "json_object":
        if set(value) != {"type"}:
            raise invalid("response_format", "response_format json_object takes no other fields")
        return {"type": "json_object"}
    if kind != "json_schema":
        if kind == "text":
            raise invalid("response_format", "response_format text takes no other fields")
        raise unsupported("response_format", f"response_format {kind!r} is not supported (text, json_object, json_schema)")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or set(value) != {"type", "json_schema"}:
        raise invalid("response_format.json_schema", "response_format json_schema needs a json_schema object")
    for key in spec:
        if key not in _SCHEMA_KEYS:
            raise invalid(f"response_format.json_schema.{key}", f"response_format.json_schema: unrecognized field {key!r}",
                          code="unknown_parameter")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME(name):
        raise invalid("response_format.json_schema.name", "response_format.json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", "response_format.json_schema.schema must be an object")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise invalid("response_format.json_schema.strict", "response_format.json_schema.strict must be a boolean")
    return {"type": "json_schema", "schema": schema}  # followed by construction, strict or not
