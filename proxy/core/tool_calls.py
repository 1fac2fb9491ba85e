"""The tool calls of one answer, gathered from the engine's deltas into OpenAI's shape (ids
`call_...`, JSON-string arguments), as whole calls and as stream entries."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any


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
