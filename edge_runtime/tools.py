"""Tool calling in the engine: a request's tools rendered into the prompt, the grammar a tool
call must follow, and a streaming parser that splits the output into content text and
tool-call deltas. How a call is written is the model family's *tool format*:

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
  Rendered by the chat template when it reads `tools` and knows `<tool_call>` (Qwen2.5, Hermes,
  SmolLM3), else by the fallback of docs/tool-calling.md: a system-prompt section listing the
  functions, assistant calls written as those blocks, tool results as a user turn.
- `glm4`: GLM-4's `<|assistant|>name\\n{arguments}` (one call per turn; a text answer starts
  with a newline), rendered by GLM-4's own template with `observation` turns for results.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .chat_template import template_variables
from .errors import InvalidRequest
from .grammar import GrammarSpec, lark_json
from .tokenizer import Tokenizer

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # bounds what a sampled model can emit in one answer
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}").fullmatch
_ANY_TEXT = "TEXT: /(.|\\n)*/"


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


def tool_format(template: str | None) -> ToolFormat:
    """The tool format of a chat template (see the module docstring)."""
    if template and "<|observation|>" in template:
        return Glm4Format(tools_on_message="item['tools']" in template or 'item["tools"]' in template)
    native = template is not None and "tools" in template_variables(template) and "<tool_call>" in template
    return HermesFormat(native)


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


def _arguments_value(arguments: str) -> Any:
    """Arguments as the object templates expect (HF convention), or the text when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- hermes

TOOLS_SECTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class HermesFormat:
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, native: bool) -> None:
        self.native = native

    def render(self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
        if self.native:
            chat = [self._native_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
            return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=[t.as_openai() for t in tools] or None)
        # Results go in a `tool` turn (small models answer from it best) unless the template
        # refuses that role or drops it; then in a user turn.
        results = [m.get("content", "") for m in messages if m.get("role") == "tool"]
        if results:
            try:
                text = tokenizer.apply_chat_template(self.fallback_messages(messages, tools, "tool"), add_generation_prompt=True)
                if results[0] in text:
                    return text
            except InvalidRequest:
                pass
        return tokenizer.apply_chat_template(self.fallback_messages(messages, tools, "user"), add_generation_prompt=True)

    @staticmethod
    def _native_message(message: dict[str, Any], where: str) -> dict[str, Any]:
        if not message.get("tool_calls"):
            return message
        calls = [{"type": "function", "function": {"name": name, "arguments": _arguments_value(args)}}
                 for name, args in call_list(message, where)]
        return {**message, "tool_calls": calls}

    def fallback_messages(self, messages: list[dict[str, Any]], tools: list[Tool], result_role: str) -> list[dict[str, Any]]:
        """The conversation for a template that knows no tools: tools in the system prompt, calls
        as blocks in assistant turns, consecutive results merged into one `result_role` turn."""
        out: list[dict[str, Any]] = []
        merging = False  # the last message out holds tool results
        for i, message in enumerate(messages):
            role = message.get("role")
            if role == "tool":
                block = f"<tool_response>\n{message.get('content', '')}\n</tool_response>"
                if merging:
                    out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
                else:
                    out.append({"role": result_role, "content": block})
                merging = True
                continue
            merging = False
            rest = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
            if role == "assistant" and message.get("tool_calls"):
                blocks = [self.call_text(name, args) for name, args in call_list(message, f"messages[{i}]")]
                rest["content"] = "\n".join([message["content"], *blocks] if message.get("content") else blocks)
            out.append(rest)
        if tools:
            section = TOOLS_SECTION.format(tools="\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools))
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{section}"}
            else:
                out.insert(0, {"role": "system", "content": section})
        return out

    def call_text(self, name: str, arguments: str) -> str:
        value = _arguments_value(arguments)
        args = arguments if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return f'{self.OPEN}\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n{self.CLOSE}'

    def grammar(self, tools: list[Tool], spec: GrammarSpec) -> str:
        options = chosen(tools, spec)
        lines = ["%llguidance {}"]
        more = f' ({_lit(chr(10) + self.OPEN)} body){{0,{MAX_PARALLEL_CALLS - 1}}}' if spec.parallel else ""
        if spec.mode == "auto":  # free text, or text up to the trigger and then calls only
            lines += [f"start: text | text_trig body{more}", "text: TEXT", _ANY_TEXT, f"text_trig[lazy]: TEXT {_lit(self.OPEN)}"]
        else:
            lines.append(f"start: {_lit(self.OPEN)} body{more}")
        lines.append(f'body: "\\n" ({" | ".join(f"fn_{i}" for i in range(len(options)))}) {_lit(chr(10) + self.CLOSE)}')
        for i, tool in enumerate(options):
            head = _lit(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
            lines.append(f'fn_{i}: {head} {lark_json(tool.parameters)} "}}"')
        return "\n".join(lines) + "\n"

    def parser(self) -> ToolCallParser:
        return HermesParser()


_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class HermesParser:
    """Content until `<tool_call>` (holding back what may be its start), then each call's name
    once its header is read and its arguments as they stream, up to `</tool_call>`."""

    def __init__(self) -> None:
        self.calls = 0
        self._state = "text"  # text -> head -> args -> tail -> text
        self._buf = ""
        self._json = _JsonEnd()

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._step(content, deltas):
            pass
        return "".join(content), _merged(deltas)

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        held, self._buf = self._buf, ""
        return (self._content(held), []) if self._state == "text" else ("", [])

    def _content(self, text: str) -> str:
        # Between and after calls the grammar allows only newlines: not content.
        return text if not self.calls or text.strip() else ""

    def _step(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Advance one state if the buffer allows; False when more text is needed."""
        buf = self._buf
        if self._state == "text":
            i = buf.find(HermesFormat.OPEN)
            if i < 0:
                keep = _partial_suffix(buf, HermesFormat.OPEN)
                content.append(self._content(buf[: len(buf) - keep]))
                self._buf = buf[len(buf) - keep :]
                return False
            content.append(self._content(buf[:i]))
            self._buf, self._state = buf[i + len(HermesFormat.OPEN) :], "head"
            return True
        if self._state == "head":
            m = _HERMES_HEAD.match(buf)
            if m is None or m.end() == len(buf):
                return False  # the header is complete once the arguments begin
            deltas.append(ToolCallDelta(self.calls, name=json.loads(f'"{m.group(1)}"')))
            self._buf, self._state = buf[m.end() :], "args"
            self._json = _JsonEnd()
            return True
        if self._state == "args":
            end = self._json.feed(buf)
            fragment = buf if end is None else buf[:end]
            if fragment:
                deltas.append(ToolCallDelta(self.calls, arguments=fragment))
            if end is None:
                self._buf = ""
                return False
            self._buf, self._state = buf[end:], "tail"
            return True
        i = buf.find(HermesFormat.CLOSE)  # tail: `}` and the closing tag
        if i < 0:
            return False
        self._buf, self._state = buf[i + len(HermesFormat.CLOSE) :], "text"
        self.calls += 1
        return True


class _JsonEnd:
    """Finds where one JSON object or array ends in text fed piece by piece."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> int | None:
        """Index in `text` just past the value's end, or None if it goes on."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive deltas of one call as one (a name and its first arguments in one frame)."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and (d.name is None or out[-1].name is None and not out[-1].arguments):
            out[-1] = ToolCallDelta(d.index, out[-1].name or d.name, out[-1].arguments + d.arguments)
        else:
            out.append(d)
    return out


# ---------------------------------------------------------------------------------------------- glm4


class Glm4Format:
    name = "glm4"
    native = True

    def __init__(self, tools_on_message: bool) -> None:
        self._tools_on_message = tools_on_message  # glm-4-9b-chat reads `item['tools']` of a message

    def render(self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Tool]) -> str:
        chat: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role == "tool":
                chat.append({"role": "observation", "content": message.get("content", "")})
            elif role == "assistant" and message.get("tool_calls"):
                if message.get("content"):
                    chat.append({"role": "assistant", "content": message["content"]})
                chat += [{"role": "assistant", "metadata": name, "content": args}
                         for name, args in call_list(message, f"messages[{i}]")]
            else:
                chat.append({k: v for k, v in message.items() if k != "tool_call_id"})
        specs = [t.as_openai() for t in tools]
        if specs and self._tools_on_message:
            chat[0] = {**chat[0], "tools": specs}
        return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=specs or None)

    def grammar(self, tools: list[Tool], spec: GrammarSpec) -> str:
        options = chosen(tools, spec)
        calls = " | ".join(f"fn_{i}" for i in range(len(options)))
        lines = ["%llguidance {}", f'start: "\\n" TEXT | {calls}' if spec.mode == "auto" else f"start: {calls}"]
        if spec.mode == "auto":
            lines.append(_ANY_TEXT)
        lines += [f"fn_{i}: {_lit(tool.name + chr(10))} {lark_json(tool.parameters)}" for i, tool in enumerate(options)]
        return "\n".join(lines) + "\n"

    def parser(self) -> ToolCallParser:
        return Glm4Parser()


class Glm4Parser:
    """A leading newline means a text answer; anything else is `name\\n` and then the arguments."""

    def __init__(self) -> None:
        self.calls = 0
        self._state = "start"  # start -> text | name -> args
        self._buf = ""

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._state == "text":
            return text, []
        if self._state == "args":
            return "", [ToolCallDelta(0, arguments=text)] if text else []
        self._buf += text
        if self._state == "start" and self._buf:
            if self._buf.startswith("\n"):
                self._state, rest, self._buf = "text", self._buf[1:], ""
                return rest, []
            self._state = "name"
        i = self._buf.find("\n")
        if i < 0:
            return "", []
        name, rest, self._buf = self._buf[:i].strip(), self._buf[i + 1 :], ""
        self._state, self.calls = "args", 1
        return "", [ToolCallDelta(0, name=name, arguments=rest)]

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        held, self._buf = self._buf, ""
        return (held, []) if self._state in ("start", "text") else ("", [])
