"""The offload protocol between gateways and cloud workers (docs/offload-protocol.md): one msgpack
request on `{prefix}/offload/request`, numbered msgpack chunks back on the gateway's
`{prefix}/{gw}/offload/reply`, and a cancel on the gateway's `{prefix}/{gw}/offload/cancel`.

Every message is sealed with the fleet's offload secret: an HMAC-SHA256 over the topic it is
published to and its payload, carried with the payload in a msgpack envelope (so it works over
MQTT 3.1.1 too). The topic is in the MAC so that a sealed message cannot be replayed elsewhere
(a chunk to another gateway, a request as a cancel). Without a secret (`allow_unauthenticated`,
labs only) messages travel bare.

The chunks carry the engine's own frames (docs/engine-protocol.md): token frames, then a done
frame, or an error frame; so a gateway relays an offloaded answer through the very code that
relays a local one. Chunk 0 is `accepted` (a worker took the request). A request that asks for
them (`heartbeat_s`) gets `heartbeat` chunks while the worker computes without sending anything
else, so that a gateway tells a hung worker from a slow answer in about a second.

Workers announce themselves on `{prefix}/offload/worker/{client id}` (retained, sealed
`{"state": "online" | "draining", ...}`); their Last Will empties that topic, so that a worker
that dies is known to be gone as soon as the broker notices (presence_payload, parse_presence)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Annotated, Any, Literal, Optional

import msgpack
import msgspec
from msgspec import Meta

from edge_wire.messages import MAX_TIMEOUT_S, ChatMessage
from edge_wire.sampling import MAX_INT, RequestedSampling
from edge_wire.validation import explain

VERSION = 1
CONTENT_TYPE = "application/msgpack"
ACCEPTED, TOKEN, DONE, ERROR, HEARTBEAT = "accepted", "token", "done", "error", "heartbeat"
TERMINAL = frozenset({DONE, ERROR})
MAX_ID_CHARS = 160
EXPIRED = "expired"  # error code: the request's deadline passed before a worker could start it
ONLINE, DRAINING, GONE = "online", "draining", "gone"  # a worker's presence (gone: the topic emptied)
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 0.05, 60.0
_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,160}\Z"  # \Z: Python's $ would let a trailing newline through
_ID = re.compile(_ID_PATTERN).match
_PROMPT_KEYS = ("prompt", "messages", "prompt_ids")
_STRUCTURED_KEYS = ("tools", "grammar")


_MAC_CONTEXT = b"edge-offload-v1\0"


class ProtocolError(ValueError):
    """A message that does not follow the offload protocol."""


class Unauthenticated(ProtocolError):
    """A message that is not sealed with the fleet's offload secret."""


def _mac(key: bytes, topic: str, payload: bytes) -> bytes:
    return hmac.new(key, _MAC_CONTEXT + topic.encode("utf-8", "surrogatepass") + b"\0" + payload, hashlib.sha256).digest()


def seal(key: bytes | None, topic: str, payload: bytes) -> bytes:
    """`payload` as published to `topic`: in its envelope with its MAC (bare without a key)."""
    if key is None:
        return payload
    return msgpack.packb({"msg": payload, "mac": _mac(key, topic, payload)}, use_bin_type=True)


def unseal(key: bytes | None, topic: str, data: bytes) -> dict[str, Any]:
    """The map a sealed message published to `topic` carries; Unauthenticated when its MAC is
    missing or wrong (without a key: the bare map), ProtocolError when it is malformed."""
    if key is None:
        return decode(data)
    envelope = decode(data)
    payload, mac = envelope.get("msg"), envelope.get("mac")
    if not isinstance(payload, bytes) or not isinstance(mac, bytes):
        raise Unauthenticated("not sealed with the offload secret")
    if not hmac.compare_digest(mac, _mac(key, topic, payload)):
        raise Unauthenticated("bad MAC (another secret, another topic, or altered)")
    return decode(payload)


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


class OffloadRequest(msgspec.Struct, kw_only=True):
    """An offloaded request. Fields it does not know are passed over (a newer gateway may send
    more); the prompt and the sampling parameters follow the engine protocol's rules."""

    v: Literal[1]
    id: Annotated[str, Meta(pattern=_ID_PATTERN)]
    kind: Literal["chat", "completion"]
    gateway: Optional[str] = None
    reply_to: Optional[str] = None
    deadline: Optional[Annotated[float, Meta(ge=0.0, le=1e11, description="unix time")]] = None
    timeout_s: Optional[Annotated[float, Meta(gt=0.0, le=MAX_TIMEOUT_S)]] = None
    model: str = ""
    prompt: Optional[Annotated[str, Meta(min_length=1)]] = None
    messages: Optional[Annotated[list[ChatMessage], Meta(min_length=1)]] = None
    prompt_ids: Optional[Annotated[list[Annotated[int, Meta(ge=0, le=MAX_INT)]], Meta(min_length=1)]] = None
    params: RequestedSampling = msgspec.field(default_factory=RequestedSampling)
    tools: Optional[list[dict[str, Any]]] = None  # the engine's to check
    grammar: Optional[dict[str, Any]] = None
    trace: Optional[dict[str, str]] = None
    heartbeat_s: Optional[Annotated[float, Meta(ge=MIN_HEARTBEAT_S, le=MAX_HEARTBEAT_S)]] = None  # send heartbeats this often

    def __post_init__(self) -> None:
        if sum(p is not None for p in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise ValueError("prompt: exactly one of prompt, messages, prompt_ids")

    def prompt_fields(self) -> dict[str, Any]:
        """The engine's prompt argument."""
        return {key: msgspec.to_builtins(getattr(self, key)) for key in _PROMPT_KEYS if getattr(self, key) is not None}

    def structured(self) -> dict[str, Any]:
        """The engine's tools and grammar fields, those present."""
        return {key: getattr(self, key) for key in _STRUCTURED_KEYS if getattr(self, key) is not None}


def parse_request(obj: dict[str, Any]) -> OffloadRequest:
    """The request, typed; ProtocolError names the field at fault."""
    try:
        return msgspec.convert(obj, OffloadRequest)
    except msgspec.ValidationError as exc:
        raise ProtocolError(explain(exc, OffloadRequest, obj).message(": ")) from None


def encode_chunk(request_id: str, seq: int, frame: dict[str, Any], worker: str | None = None) -> bytes:
    """One chunk: an engine frame (its own `id` replaced by the offload id) with its number and
    the worker that sent it."""
    chunk = {**frame, "id": request_id, "seq": seq}
    if worker is not None:
        chunk["worker"] = worker
    return msgpack.packb(chunk, use_bin_type=True)


def accepted_chunk(request_id: str, worker: str, heartbeat_s: float | None = None) -> bytes:
    """Chunk 0; with `heartbeat_s`, the worker promises a chunk (a heartbeat at least) that often."""
    frame: dict[str, Any] = {"type": ACCEPTED}
    if heartbeat_s is not None:
        frame["heartbeat_s"] = heartbeat_s
    return encode_chunk(request_id, 0, frame, worker)


def heartbeat_chunk(request_id: str, last_seq: int, worker: str) -> bytes:
    """`still computing`: its `seq` is the last chunk sent before it (a heartbeat takes no number
    of its own), so that a gateway missing that chunk knows it was lost."""
    return encode_chunk(request_id, last_seq, {"type": HEARTBEAT}, worker)


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
    if kind not in (ACCEPTED, TOKEN, DONE, ERROR, HEARTBEAT):
        raise ProtocolError(f"type: unknown {kind!r}")
    if kind == TOKEN and not isinstance(obj.get("text"), str):
        raise ProtocolError("token: text must be a string")
    return request_id, seq, obj


def encode_cancel(request_id: str, gateway: str) -> bytes:
    return msgpack.packb({"id": request_id, "gateway": gateway}, use_bin_type=True)


def presence_payload(state: str, worker: str, heartbeat_s: float | None = None, now: float | None = None) -> bytes:
    """A worker's presence (`online`, `draining`); `gone` is an empty retained payload instead."""
    body: dict[str, Any] = {"v": VERSION, "state": state, "worker": worker, "ts": time.time() if now is None else now}
    if heartbeat_s is not None:
        body["heartbeat_s"] = heartbeat_s
    return msgpack.packb(body, use_bin_type=True)


def parse_presence(key: bytes | None, topic: str, data: bytes) -> tuple[str, str | None]:
    """(state, worker id) of a presence message: (GONE, None) for the empty payload of a Will or
    a clean stop; Unauthenticated / ProtocolError for anything else that is not a presence."""
    if not data:
        return GONE, None
    obj = unseal(key, topic, data)
    state, worker = obj.get("state"), obj.get("worker")
    if state not in (ONLINE, DRAINING) or not valid_id(worker):
        raise ProtocolError("presence: state must be online or draining, worker a valid id")
    return state, worker
