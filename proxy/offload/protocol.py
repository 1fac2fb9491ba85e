"""The offload protocol between gateways and cloud workers (docs/offload-protocol.md): one msgpack
request on `{prefix}/offload/request`, numbered msgpack chunks back on the gateway's
`{prefix}/{gw}/offload/reply`, and a cancel on `{prefix}/offload/cancel`.

The chunks carry the engine's own frames (docs/engine-protocol.md): token frames, then a done
frame, or an error frame; so a gateway relays an offloaded answer through the very code that
relays a local one. Chunk 0 is `accepted` (a worker took the request)."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import msgpack

VERSION = 1
CONTENT_TYPE = "application/msgpack"
ACCEPTED, TOKEN, DONE, ERROR = "accepted", "token", "done", "error"
TERMINAL = frozenset({DONE, ERROR})
MAX_ID_CHARS = 160
EXPIRED = "expired"  # error code: the request's deadline passed before a worker could start it
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,160}").fullmatch
_PROMPT_KEYS = ("prompt", "messages", "prompt_ids")
_OPTIONAL_KEYS = ("tools", "grammar", "trace")


class ProtocolError(ValueError):
    """A message that does not follow the offload protocol."""


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID(value) is not None


def encode_request(*, request_id: str, gateway: str, reply_to: str, timeout_s: float, kind: str, model: str,
                   prompt: dict[str, Any], params: dict[str, Any], extra: dict[str, Any] | None = None,
                   now: float | None = None) -> bytes:
    """The request payload. It carries everything MQTT v5 properties also say (reply topic,
    id, deadline), so that it works unchanged over a 3.1.1 broker."""
    now = time.time() if now is None else now
    body: dict[str, Any] = {"v": VERSION, "id": request_id, "gateway": gateway, "reply_to": reply_to,
                            "deadline": now + timeout_s, "timeout_s": timeout_s, "kind": kind, "model": model,
                            **prompt, "params": params}
    for key, value in (extra or {}).items():
        if value is not None:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


def decode(payload: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_str_len=16 << 20, max_bin_len=16 << 20,
                              max_array_len=1 << 20, max_map_len=1 << 16)
    except Exception as exc:  # msgpack raises several types, ValueError among them
        raise ProtocolError(f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a msgpack map")
    return obj


def parse_request(obj: dict[str, Any]) -> dict[str, Any]:
    """Check the fields a worker relies on; the prompt and params are the engine's to check."""
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported version {obj.get('v')!r}")
    if not valid_id(obj.get("id")):
        raise ProtocolError("id: missing or malformed")
    if obj.get("kind") not in ("chat", "completion"):
        raise ProtocolError("kind: must be 'chat' or 'completion'")
    if sum(key in obj for key in _PROMPT_KEYS) != 1:
        raise ProtocolError("exactly one of prompt, messages, prompt_ids")
    if not isinstance(obj.get("params", {}), dict):
        raise ProtocolError("params: must be a map")
    for key in ("deadline", "timeout_s"):
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ProtocolError(f"{key}: must be a number")
    if not isinstance(obj.get("model", ""), str):
        raise ProtocolError("model: must be a string")
    return obj


def prompt_of(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: obj[key] for key in _PROMPT_KEYS if key in obj}


def extras_of(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: obj[key] for key in _OPTIONAL_KEYS if obj.get(key) is not None}


def encode_chunk(request_id: str, seq: int, frame: dict[str, Any], worker: str | None = None) -> bytes:
    """One chunk: an engine frame (its own `id` replaced by the offload id) with its number and
    the worker that sent it."""
    chunk = {**frame, "id": request_id, "seq": seq}
    if worker is not None:
        chunk["worker"] = worker
    return msgpack.packb(chunk, use_bin_type=True)


def accepted_chunk(request_id: str, worker: str) -> bytes:
    return encode_chunk(request_id, 0, {"type": ACCEPTED}, worker)


def error_frame(code: str, message: str, param: str | None = None, estimated_wait_s: float | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": ERROR, "code": code, "message": message}
    if param is not None:
        frame["param"] = param
    if estimated_wait_s is not None:
        frame["estimated_wait_s"] = estimated_wait_s
    return frame


def parse_chunk(obj: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    request_id, seq, kind = obj.get("id"), obj.get("seq"), obj.get("type")
    if not valid_id(request_id):
        raise ProtocolError("id: missing or malformed")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ProtocolError("seq: must be a non-negative integer")
    if kind not in (ACCEPTED, TOKEN, DONE, ERROR):
        raise ProtocolError(f"type: unknown {kind!r}")
    if kind == TOKEN and not isinstance(obj.get("text"), str):
        raise ProtocolError("token: text must be a string")
    return request_id, seq, obj


def encode_cancel(request_id: str) -> bytes:
    return msgpack.packb({"id": request_id}, use_bin_type=True)
