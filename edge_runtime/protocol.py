"""The engine's wire protocol (docs/engine-protocol.md): frames of a 4-byte big-endian length
followed by one msgpack map, and the validation of every client frame into a typed operation.
Shared by the server and the client; knows nothing of sockets beyond asyncio streams."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Collection
from dataclasses import dataclass
from numbers import Real
from typing import Any, Union

import msgpack

from .errors import InvalidRequest
from .grammar import GrammarSpec, parse_grammar
from .sampling import SamplingParams
from .tools import Tool, ToolCallDelta, parse_tools

VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20  # bytes of msgpack payload, the length prefix not counted
MAX_ID_CHARS = 128
MAX_MESSAGES = 1024
MAX_TRACE_FIELD_CHARS = 512
_HEADER = struct.Struct(">I")

# Error codes. After a fatal one the byte stream cannot be trusted, so the server closes.
BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
UNKNOWN_OP = "unknown_op"
INVALID_REQUEST = "invalid_request"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
BUSY = "busy"
NOT_FOUND = "not_found"
DUPLICATE_ID = "duplicate_id"  # answers the rejected frame; the stream in flight goes on
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"
FATAL_CODES = frozenset({BAD_FRAME, FRAME_TOO_LARGE})


class ProtocolError(Exception):
    """A client frame the server will not act on; becomes an error frame."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        *,
        estimated_wait_s: float | None = None,
        fatal: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.estimated_wait_s = estimated_wait_s
        self.fatal = code in FATAL_CODES if fatal is None else fatal

    def frame(self, request_id: str | None) -> dict[str, Any]:
        return error_frame(request_id, self.code, self.message, self.param, self.estimated_wait_s)


# ---------------------------------------------------------------------------------------------- framing


def encode_frame(payload: dict[str, Any]) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def decode_payload(body: bytes) -> dict[str, Any]:
    """The map in one frame's payload. Malformed msgpack is fatal; a well-formed non-map is not
    (the frame boundary is intact, so the connection can go on)."""
    try:
        payload = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, UnicodeDecodeError, ...)
        raise ProtocolError(BAD_FRAME, f"malformed msgpack payload ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise ProtocolError(BAD_FRAME, f"frame payload must be a msgpack map, got {type(payload).__name__}", fatal=False)
    return payload


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME) -> dict[str, Any] | None:
    """The next frame's map, or None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError(BAD_FRAME, "truncated frame: stream ended inside a length prefix") from None
    (size,) = _HEADER.unpack(header)
    if size > max_size:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the limit of {max_size} bytes")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(BAD_FRAME, f"truncated frame: stream ended after {len(exc.partial)} of {size} bytes") from None
    return decode_payload(body)


# ---------------------------------------------------------------------------------------------- server frames


def error_frame(
    request_id: str | None,
    code: str,
    message: str,
    param: str | None = None,
    estimated_wait_s: float | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    if param is not None:
        frame["param"] = param
    if estimated_wait_s is not None:
        frame["estimated_wait_s"] = estimated_wait_s
    return frame


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
        },
    }


# ---------------------------------------------------------------------------------------------- client frames


@dataclass
class GenerateOp:
    id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_ids: list[int] | None = None
    timeout_s: float | None = None
    trace: dict[str, str] | None = None
    tools: list[Tool] | None = None
    grammar: GrammarSpec | None = None


@dataclass
class CancelOp:
    id: str


@dataclass
class StatusOp:
    id: str | None = None


@dataclass
class ModelsOp:
    id: str | None = None


Op = Union[GenerateOp, CancelOp, StatusOp, ModelsOp]

_GENERATE_KEYS = frozenset({"op", "id", "prompt", "messages", "prompt_ids", "params", "timeout_s", "trace", "tools", "grammar"})
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})


def frame_id(frame: dict[str, Any]) -> str | None:
    """The frame's id if it is a valid one (to echo on an error about the frame), else None."""
    value = frame.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS else None


def parse_op(frame: dict[str, Any]) -> Op:
    """Validate a client frame into its operation; raises ProtocolError naming the field at fault."""
    op = frame.get("op")
    if op is None:
        raise ProtocolError(INVALID_REQUEST, "missing op", "op")
    if op == "generate":
        return _parse_generate(frame)
    if op == "cancel":
        _only_keys(frame, {"op", "id"})
        return CancelOp(_id(frame, required=True))
    if op == "status":
        _only_keys(frame, {"op", "id"})
        return StatusOp(_id(frame, required=False))
    if op == "models":
        _only_keys(frame, {"op", "id"})
        return ModelsOp(_id(frame, required=False))
    raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r} (expected generate, cancel, status or models)", "op")


def _only_keys(frame: dict[str, Any], allowed: Collection[str]) -> None:
    for key in frame:
        if key not in allowed:
            raise ProtocolError(INVALID_REQUEST, f"unknown field {key!r}", str(key))


def _id(frame: dict[str, Any], required: bool) -> str | None:
    value = frame.get("id")
    if value is None:
        if required:
            raise ProtocolError(INVALID_REQUEST, "missing id", "id")
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProtocolError(INVALID_REQUEST, f"id must be a string of 1 to {MAX_ID_CHARS} characters", "id")
    return value


def _parse_generate(frame: dict[str, Any]) -> GenerateOp:
    _only_keys(frame, _GENERATE_KEYS)
    request_id = _id(frame, required=True)
    given = [key for key in ("prompt", "messages", "prompt_ids") if frame.get(key) is not None]
    if len(given) != 1:
        raise ProtocolError(INVALID_REQUEST, "exactly one of prompt, messages or prompt_ids is required", "prompt")
    op = GenerateOp(request_id, _params(frame.get("params")))
    if "prompt" in given:
        op.prompt = _prompt(frame["prompt"])
    elif "messages" in given:
        op.messages = _messages(frame["messages"])
    else:
        op.prompt_ids = _prompt_ids(frame["prompt_ids"])
    op.timeout_s = _timeout(frame.get("timeout_s"))
    op.trace = _trace(frame.get("trace"))
    _structured(op, frame)
    return op


def _structured(op: GenerateOp, frame: dict[str, Any]) -> None:
    """`tools` (with `messages` only) and `grammar` (a tool-call grammar needs the tools)."""
    try:
        if frame.get("tools") is not None:
            if op.messages is None:
                raise InvalidRequest("tools", "tools need messages (they are rendered with the chat template)")
            op.tools = parse_tools(frame["tools"])
        if frame.get("grammar") is not None:
            op.grammar = parse_grammar(frame["grammar"])
            if op.grammar.type == "tool_calls" and not op.tools:
                raise InvalidRequest("grammar", "a tool_calls grammar needs tools")
            if op.params.ignore_eos:
                raise InvalidRequest("params.ignore_eos", "cannot be combined with a grammar (it ends the output)")
    except InvalidRequest as exc:
        raise ProtocolError(INVALID_REQUEST, str(exc), exc.param) from None


def _params(value: Any) -> SamplingParams:
    try:
        return SamplingParams.from_dict({} if value is None else value)
    except InvalidRequest as exc:
        param = exc.param if exc.param == "params" else f"params.{exc.param}"
        raise ProtocolError(INVALID_REQUEST, str(exc), param) from None


def _prompt(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(INVALID_REQUEST, "prompt must be a non-empty string", "prompt")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ProtocolError(INVALID_REQUEST, "messages must be a non-empty list", "messages")
    if len(value) > MAX_MESSAGES:
        raise ProtocolError(INVALID_REQUEST, f"at most {MAX_MESSAGES} messages", "messages")
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ProtocolError(INVALID_REQUEST, f"{where} must be a map", where)
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ProtocolError(INVALID_REQUEST, f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def _prompt_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ProtocolError(INVALID_REQUEST, "prompt_ids must be a non-empty list of integers", "prompt_ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ProtocolError(INVALID_REQUEST, "prompt_ids must hold only integers", "prompt_ids")
    return value


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ProtocolError(INVALID_REQUEST, "timeout_s must be a positive number of seconds", "timeout_s")
    return float(value)


def _trace(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(INVALID_REQUEST, "trace must be a map", "trace")
    for key, field in value.items():
        if key not in _TRACE_KEYS:
            raise ProtocolError(INVALID_REQUEST, f"unknown trace field {key!r}", f"trace.{key}")
        if not isinstance(field, str) or len(field) > MAX_TRACE_FIELD_CHARS:
            raise ProtocolError(
                INVALID_REQUEST, f"trace.{key} must be a string of at most {MAX_TRACE_FIELD_CHARS} characters", f"trace.{key}"
            )
    return value
