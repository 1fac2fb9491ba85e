"""One answer as the engine streams it: content text and tool-call arguments passed through the
safety filter's output guards (so a blocked phrase split across frames is never released),
tool calls gathered into OpenAI's shape (complete calls only: proxy/core/tool_calls.py), logprobs kept. Shared by plain and streamed answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..safety import Category, OutputGuard, SafetyFilter
from .tool_calls import ToolCalls

CONTENT_FILTER = "content_filter"


@dataclass
class Released:
    """What one engine frame lets the client see now."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class Answer:
    def __init__(self, safety: SafetyFilter, logprobs: bool) -> None:
        self._safety = safety
        self._guard = safety.output_guard() if safety.checks_output else None
        self._arg_guards: dict[int, OutputGuard] = {}
        self.raw: list[str] = []  # the engine's content, as generated (what the cache keeps)
        self.shown: list[str] = []  # the content released to the client
        self.logprobs: list[tuple[str, float]] | None = [] if logprobs else None
        self.tools = ToolCalls()
        self.blocked: Category | None = None

    @property
    def text(self) -> str:
        return "".join(self.shown)

    def token(self, frame: dict[str, Any]) -> Released:
        """Take a token frame; return what may be sent now (nothing more once blocked)."""
        text = frame["text"]
        self.raw.append(text)
        if self.logprobs is not None:
            self.logprobs.append((text, frame.get("logprob", 0.0)))
        out = Released(self._content(text) if self.blocked is None else "")
        deltas = frame.get("tool_calls")
        if deltas and self.blocked is None:
            out.tool_calls = self.tools.add([self._filtered(d) for d in deltas])
        return out

    def end(self, finish_reason: str | None) -> Released:
        """What the guards still hold once the engine's answer is complete (`finish_reason` is the
        engine's; None when the answer ended another way): the calls it completes; calls still
        open are dropped."""
        out = Released()
        if self.blocked is not None:
            return out
        if self._guard is not None:
            out.text = self._guard.flush()
            self._note(self._guard)
            self.shown.append(out.text)
        for index, guard in self._arg_guards.items():
            rest = guard.flush()
            self._note(guard)
            if rest:
                out.tool_calls += self.tools.add([{"index": index, "arguments": rest}])
        self.tools.end(finish_reason or "")
        return out

    def _content(self, text: str) -> str:
        if self._guard is None:
            self.shown.append(text)
            return text
        released = self._guard.push(text)
        self._note(self._guard)
        self.shown.append(released)
        return released

    def _filtered(self, delta: dict[str, Any]) -> dict[str, Any]:
        if not self._safety.checks_output or not delta.get("arguments"):
            return delta
        guard = self._arg_guards.setdefault(delta["index"], self._safety.output_guard())
        released = guard.push(delta["arguments"])
        self._note(guard)
        return {**delta, "arguments": released}

    def _note(self, guard: OutputGuard) -> None:
        if guard.blocked is not None and self.blocked is None:
            self.blocked = guard.blocked
