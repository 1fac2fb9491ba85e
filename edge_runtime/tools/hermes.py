"""The `hermes` tool format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
block per call, rendered by the chat template when it reads `tools` and knows `<tool_call>` (Qwen2.5,
Hermes, SmolLM3), else by the fallback of docs/tool-calling.md."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import InvalidRequest
from ..grammar import GrammarSpec, lark_json
from ..tokenizer import Tokenizer
from .base import (
    ANY_TEXT,
    MAX_PARALLEL_CALLS,
    Tool,
    ToolCallDelta,
    ToolCallParser,
    arguments_value,
    call_list,
    chosen,
    lark_literal,
)

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
        calls = [{"type": "function", "function": {"name": name, "arguments": arguments_value(args)}}
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
        value = arguments_value(arguments)
        args = arguments if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return f'{self.OPEN}\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n{self.CLOSE}'

    def grammar(self, tools: list[Tool], spec: GrammarSpec) -> str:
        options = chosen(tools, spec)
        lines = ["%llguidance {}"]
        more = f' ({lark_literal(chr(10) + self.OPEN)} body){{0,{MAX_PARALLEL_CALLS - 1}}}' if spec.parallel else ""
        if spec.mode == "auto":  # free text, or text up to the trigger and then calls only
            lines += [f"start: text | text_trig body{more}", "text: TEXT", ANY_TEXT, f"text_trig[lazy]: TEXT {lark_literal(self.OPEN)}"]
        else:
            lines.append(f"start: {lark_literal(self.OPEN)} body{more}")
        lines.append(f'body: "\\n" ({" | ".join(f"fn_{i}" for i in range(len(options)))}) {lark_literal(chr(10) + self.CLOSE)}')
        for i, tool in enumerate(options):
            head = lark_literal(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
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


