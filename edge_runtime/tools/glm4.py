"""The `glm4` tool format: GLM-4's `<|assistant|>name\\n{arguments}` (one call per turn; a text
answer starts with a newline), rendered by GLM-4's own template with `observation` turns for
results."""

from __future__ import annotations

from typing import Any

from ..grammar import GrammarSpec, lark_json
from ..tokenizer import Tokenizer
from .base import ANY_TEXT, Tool, ToolCallDelta, ToolCallParser, call_list, chosen, lark_literal


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
            lines.append(ANY_TEXT)
        lines += [f"fn_{i}: {lark_literal(tool.name + chr(10))} {lark_json(tool.parameters)}" for i, tool in enumerate(options)]
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
