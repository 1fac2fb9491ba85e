"""The engine protocol's client frames as typed messages (docs/engine-protocol.md): what each op
may carry, with the rule of every field. `parse_op` turns a frame's map into its message, or a
ProtocolError naming the field at fault."""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

import msgspec
from msgspec import Meta

from .frames import INVALID_REQUEST, UNKNOWN_OP, ProtocolError
from .sampling import MAX_INT, SamplingParams
from .validation import MISSING_FIELD, explain

MAX_ID_CHARS = 128
MAX_MESSAGES = 1024
MAX_TRACE_FIELD_CHARS = 512
MAX_TIMEOUT_S = 86400.0

RequestId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, description="the request's id, unique per connection")]
TraceField = Annotated[str, Meta(max_length=MAX_TRACE_FIELD_CHARS)]


class Trace(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """W3C trace context of the caller's span."""

    traceparent: Optional[TraceField] = None
    tracestate: Optional[TraceField] = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One chat turn as the chat template takes it."""

    role: str
    content: str
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # checked by the engine's tool-call format
    tool_call_id: Optional[str] = None


class GenerateOp(msgspec.Struct, tag="generate", tag_field="op", forbid_unknown_fields=True, omit_defaults=True,
                 kw_only=True):
    id: RequestId
    prompt: Optional[Annotated[str, Meta(min_length=1)]] = None
    messages: Optional[Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]] = None
    prompt_ids: Optional[Annotated[list[Annotated[int, Meta(ge=0, le=MAX_INT)]], Meta(min_length=1)]] = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    timeout_s: Optional[Annotated[float, Meta(gt=0.0, le=MAX_TIMEOUT_S)]] = None
    trace: Optional[Trace] = None
    tools: Optional[list[dict[str, Any]]] = None  # compiled by the engine
    grammar: Optional[dict[str, Any]] = None  # compiled by the engine

    def __post_init__(self) -> None:
        if sum(p is not None for p in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise ValueError("prompt: exactly one of prompt, messages or prompt_ids is required")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools: tools need messages (they are rendered with the chat template)")
        if self.grammar is not None and self.params.ignore_eos:
            raise ValueError("params.ignore_eos: cannot be combined with a grammar (it ends the output)")


class CancelOp(msgspec.Struct, tag="cancel", tag_field="op", forbid_unknown_fields=True):
    id: RequestId


class StatusOp(msgspec.Struct, tag="status", tag_field="op", forbid_unknown_fields=True):
    id: Optional[RequestId] = None


class ModelsOp(msgspec.Struct, tag="models", tag_field="op", forbid_unknown_fields=True):
    id: Optional[RequestId] = None


Op = Union[GenerateOp, CancelOp, StatusOp, ModelsOp]
_OPS: dict[Any, type[Op]] = {"generate": GenerateOp, "cancel": CancelOp, "status": StatusOp, "models": ModelsOp}


def parse_op(frame: dict[str, Any]) -> Op:
    """Validate a client frame into its message; raises ProtocolError naming the field at fault."""
    op = frame.get("op")
    if op is None:
        raise ProtocolError(INVALID_REQUEST, "missing op", "op")
    kind = _OPS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r} (expected generate, cancel, status or models)", "op")
    params = frame.get("params")
    if isinstance(params, dict) and None in params.values():  # nil means the default (docs/engine-protocol.md)
        frame = {**frame, "params": {key: value for key, value in params.items() if value is not None}}
    try:
        return msgspec.convert(frame, kind)
    except msgspec.ValidationError as exc:
        problem = explain(exc, kind, frame)
        phrase = "missing" if problem.kind == MISSING_FIELD else problem.phrase
        raise ProtocolError(INVALID_REQUEST, f"{problem.path}: {phrase}" if problem.path else phrase,
                            problem.path or None) from None


def frame_id(frame: dict[str, Any]) -> str | None:
    """The frame's id if it is a valid one (to echo on an error about the frame), else None."""
    value = frame.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS else None
