"""The engine protocol's framing (docs/engine-protocol.md): a 4-byte big-endian length, then one
msgpack map; its error codes and the error frame. Knows nothing of sockets beyond asyncio streams."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20  # bytes of msgpack payload, the length prefix not counted
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
    """A frame the receiver will not act on; becomes an error frame."""

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


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME, first: bytes = b"") -> dict[str, Any] | None:
    """The next frame's map, or None at a clean end of stream (between frames). `first`: the
    frame's first bytes, when the caller has read them already (to time the rest)."""
    try:
        header = first + await reader.readexactly(_HEADER.size - len(first))
    except asyncio.IncompleteReadError as exc:
        if not exc.partial and not first:
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
