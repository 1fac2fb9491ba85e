"""OpenAI's tool calling and structured output, in the engine's terms: `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` of a chat request become the engine's `tools` and
`grammar` fields; the engine's tool-call deltas become `message.tool_calls` (ids `call_...`,
JSON-string arguments) and the `delta.tool_calls` of stream chunks."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from .errors import invalid, unsupported

MAX_TOOLS = 128  # the engine's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}").fullmatch
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
_SCHEMA_KEYS = frozenset({"name", "description", "schema", "strict"})


@dataclass(frozen=True, slots=True)
class Structured:
    """The engine fields of one request: `tools` and `grammar` (each None when not used)."""

    tools: list[dict[str, Any]] | None = None
    grammar: dict[str, Any] | None = None

    def engine_fields(self) -> dict[str, Any]:
        return {k: v for k, v in (("tools", self.tools), ("grammar", self.grammar)) if v is not None}


def parse_structured(body: dict[str, Any]) -> Structured:
    """Validate tools, tool_choice, parallel_tool_calls and response_format (400 naming the
    parameter at fault); what the engine cannot do is refused, never ignored."""
    tools = _tools(body.get("tools"))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "parallel_tool_calls must be a boolean")
    choice = _tool_choice(body.get("tool_choice"), tools)
    grammar = _response_format(body.get("response_format"))
    if tools and choice != "none":
        if grammar is not None:
            raise unsupported("response_format", "response_format together with tools is not supported (unless tool_choice is 'none')")
        grammar = {"type": "tool_calls", "mode": "auto" if choice == "auto" else "required", "parallel": parallel is not False}
        if isinstance(choice, dict):
            grammar["names"] = [choice["function"]["name"]]
    return Structured(tools, grammar)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid("tools", "tools must be an array")
    if not value:
        return None
    if len(value) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools")
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(where, f"{where} must be an object")
        if tool.get("type") != "function":
            if isinstance(tool.get("type"), str):
                raise unsupported(f"{where}.type", f"{where}: {tool['type']!r} tools are not supported (only 'function')")
            raise invalid(f"{where}.type", f"{where}.type must be 'function'")
        for key in tool:
            if key not in ("type", "function"):
                raise invalid(f"{where}.{key}", f"{where}: unrecognized field {key!r}", code="unknown_parameter")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function", f"{where}.function must be an object")
        for key in function:
            if key not in _FUNCTION_KEYS:
                raise invalid(f"{where}.function.{key}", f"{where}.function: unrecognized field {key!r}", code="unknown_parameter")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME(name):
            raise invalid(f"{where}.function.name", f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if name in names:
            raise invalid(f"{where}.function.name", f"duplicate function name {name!r}")
        names.add(name)
        entry: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise invalid(f"{where}.function.description", f"{where}.function.description must be a string")
            entry["description"] = description
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise invalid(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON schema of type object")
            entry["parameters"] = parameters
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise invalid(f"{where}.function.strict", f"{where}.function.strict must be a boolean")
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


# ---------------------------------------------------------------------------------------------- answers


@dataclass
class ToolCalls:
    """The tool calls of one answer, gathered from the engine's deltas as they stream."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take a token frame's deltas; return them as OpenAI stream entries (the first of a
        call carries its id, type and name; later ones argument fragments)."""
        out = []
        for delta in deltas:
            index = delta["index"]
            fragment = delta.get("arguments", "")
            if index == len(self.calls):
                call = {"id": "call_" + secrets.token_hex(12), "type": "function",
                        "function": {"name": delta.get("name", ""), "arguments": fragment}}
                self.calls.append(call)
                out.append({"index": index, "id": call["id"], "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": fragment}})
            elif fragment:
                self.calls[index]["function"]["arguments"] += fragment
                out.append({"index": index, "function": {"arguments": fragment}})
        return out
