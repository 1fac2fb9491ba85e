"""The engine's side of the protocol: a generate message (edge_wire.messages) with the tools and
grammar the engine compiles from it, and the token and done frames the server sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from edge_wire.frames import INVALID_REQUEST, ProtocolError
from edge_wire.messages import GenerateOp

from .errors import InvalidRequest
from .grammar import GrammarSpec, parse_grammar
from .tools import Tool, ToolCallDelta, parse_tools


@dataclass
class Generation:
    """A validated generate request, in the engine's terms."""

    op: GenerateOp
    messages: list[dict[str, Any]] | None  # as the chat template takes them
    tools: list[Tool] | None
    grammar: GrammarSpec | None


def generation(op: GenerateOp) -> Generation:
    """`op` with its tools and grammar compiled; ProtocolError names the part at fault."""
    try:
        tools = parse_tools(op.tools) if op.tools is not None else None
        grammar = parse_grammar(op.grammar) if op.grammar is not None else None
        if grammar is not None and grammar.type == "tool_calls" and not tools:
            raise InvalidRequest("grammar", "a tool_calls grammar needs tools")
    except InvalidRequest as exc:
        raise ProtocolError(INVALID_REQUEST, str(exc), exc.param) from None
    messages = msgspec.to_builtins(op.messages) if op.messages is not None else None
    return Generation(op, messages, tools, grammar)


def token_frame(request_id: str, text: str, token_id: int, logprob: float | None,
                tool_calls: list[ToolCallDelta] | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"id": request_id, "type": "token", "text": text, "token_id": token_id}
    if logprob is not None:
        frame["logprob"] = logprob
    if tool_calls:
        frame["tool_calls"] = [delta.to_frame() for delta in tool_calls]
    return frame


def done_frame(request_id: str, finish_reason: str, usage: Any, timings: Any) -> dict[str, Any]:
    """`usage` and `timings` are edge_runtime.generate's Usage and Timings (or None: zeros)."""
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else 0
    return {
        "id": request_id,
        "type": "done",
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "timings": {
            "ttft_s": timings.ttft_s if timings else 0.0,
            "total_s": timings.total_s if timings else 0.0,
            "decode_tokens_per_s": timings.decode_tokens_per_s if timings else 0.0,
            "queue_s": timings.queue_s if timings else 0.0,
        },
    }
