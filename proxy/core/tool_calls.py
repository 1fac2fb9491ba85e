"""The tool calls of one answer, gathered from the engine's deltas into OpenAI's shape (ids
`call_...`, JSON-string arguments), as whole calls and as stream entries.

Only complete calls leave this module (docs/tool-calling.md, "What a client receives"): a call is
released, in one stream entry, once its arguments parse as a JSON object. A call still open when
the answer ends (cut off by `max_tokens`: finish_reason `length`) is dropped, never presented as
a call; so is an exact repeat of a call already released in the same answer (same name, equal
arguments). Released calls are numbered 0, 1, ... in the order they completed."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TRUNCATED, DUPLICATE, INVALID = "truncated", "duplicate", "invalid"  # why a call was dropped


@dataclass
class _Open:
    """A call as the engine streams it, not yet complete."""

    name: str
    arguments: str = ""


@dataclass
class ToolCalls:
    """The tool calls of one answer, gathered from the engine's deltas as they stream."""

    calls: list[dict[str, Any]] = field(default_factory=list)  # released: complete, valid, not repeats
    dropped: Counter[str] = field(default_factory=Counter)  # TRUNCATED / DUPLICATE / INVALID -> count
    _open: dict[int, _Open] = field(default_factory=dict)  # the engine's index -> call being assembled
    _done: set[int] = field(default_factory=set)  # the engine's indexes already released or dropped
    _seen: set[tuple[str, str]] = field(default_factory=set)  # (name, canonical arguments) released

    def add(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take a token frame's deltas; return the OpenAI stream entries of the calls they
        complete (each whole: index, id, type, name and arguments)."""
        out = []
        for delta in deltas:
            index = delta["index"]
            if index in self._done:
                continue  # past a complete JSON object nothing can belong to the arguments
            call = self._open.setdefault(index, _Open(delta.get("name", "")))
            fragment = delta.get("arguments", "")
            call.arguments += fragment
            if "}" in fragment:  # an object can only end with a brace: parse no more often than that
                entry = self._release(index, call)
                if entry is not None:
                    out.append(entry)
        return out

    def end(self, finish_reason: str) -> None:
        """The answer is over: calls still open are dropped (cut off by the token limit, or
        arguments that are not a JSON object)."""
        for index in list(self._open):
            del self._open[index]
            self._done.add(index)
            self.dropped[TRUNCATED if finish_reason == "length" else INVALID] += 1

    def _release(self, index: int, call: _Open) -> dict[str, Any] | None:
        try:
            value = json.loads(call.arguments)
        except ValueError:
            return None  # not complete yet
        del self._open[index]
        self._done.add(index)
        if not isinstance(value, dict):
            self.dropped[INVALID] += 1
            return None
        key = (call.name, json.dumps(value, sort_keys=True, ensure_ascii=False))
        if key in self._seen:
            self.dropped[DUPLICATE] += 1
            return None
        self._seen.add(key)
        released = {"id": "call_" + secrets.token_hex(12), "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}
        self.calls.append(released)
        return {"index": len(self.calls) - 1, **released, "function": dict(released["function"])}
