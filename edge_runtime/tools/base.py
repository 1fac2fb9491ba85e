"""What every tool format shares: a request's tools, the deltas of the calls a parser finds, the
format and parser interfaces, and helpers for rendering calls and writing grammars."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import InvalidRequest
from ..grammar import GrammarSpec
from ..tokenizer import Tokenizer

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # bounds what a sampled model can emit in one answer
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}").fullmatch
ANY_TEXT = "TEXT: /(.|\\n)*/"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: Mapping[str, Any]  # JSON schema of the arguments object

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


def parse_tools(value: Any) -> list[Tool]:
    """Validate the `tools` field: OpenAI function tools, `{"type": "function", "function":
    {"name", "description"?, "parameters"?}}`; raises InvalidRequest naming the entry."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("tools", "must be a non-empty list")
    if len(value) > MAX_TOOLS:
        raise InvalidRequest("tools", f"at most {MAX_TOOLS} tools")
    tools: list[Tool] = []
    for i, entry in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(entry, Mapping) or entry.get("type") != "function" or not isinstance(entry.get("function"), Mapping):
            raise InvalidRequest(where, "must be {'type': 'function', 'function': {...}}")
        function = entry["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME(name):
            raise InvalidRequest(f"{where}.function.name", "must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if any(t.name == name for t in tools):
            raise InvalidRequest(f"{where}.function.name", f"duplicate tool name {name!r}")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise InvalidRequest(f"{where}.function.parameters", "must be a JSON schema of type object")
        tools.append(Tool(name, description, parameters))
    return tools


@dataclass
class ToolCallDelta:
    """A piece of one tool call as it streams: its name once, then fragments of its arguments."""

    index: int
    name: str | None = None
    arguments: str = ""

    def to_frame(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.name is not None:
            out["name"] = self.name
        if self.arguments:
            out["arguments"] = self.arguments
        return out


class ToolCallParser(Protocol):
    calls: int  # tool calls begun so far

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add output text; return (content text, tool-call deltas) that are final now."""

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """What is held back, once the output has ended."""


class ToolFormat(Protocol):
    name: str
    native: bool  # the chat template renders the tools itself

    def render(self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Tool]) -> str: ...

    def grammar(self, tools: list[Tool], spec: GrammarSpec) -> str: ...

    def parser(self) -> ToolCallParser: ...


def uses_tools(messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation holds tool calls or results (then the format must render it)."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def chosen(tools: list[Tool], spec: GrammarSpec) -> list[Tool]:
    """The tools a call may name; raises InvalidRequest for a name that is not among the tools."""
    names = {t.name for t in tools}
    for name in spec.names:
        if name not in names:
            raise InvalidRequest("grammar.names", f"no tool named {name!r} in tools")
    return [t for t in tools if not spec.names or t.name in spec.names]


def call_list(message: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """(name, arguments JSON text) of an assistant message's `tool_calls` (OpenAI shape)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where}.tool_calls", "must be a list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}.tool_calls[{j}]", "must be {'function': {'name': ..., 'arguments': ...}}")
        arguments = function.get("arguments", "{}")
        out.append((function["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)))
    return out


def arguments_value(arguments: str) -> Any:
    """Arguments as the object templates expect (HF convention), or the text when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def lark_literal(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


