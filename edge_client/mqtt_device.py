"""DeviceClient: a device's side of docs/mqtt-device-protocol.md, on paho-mqtt. The device is its
MQTT client id: a request is published to `{prefix}/{gateway}/infer/request/{client_id}`; answers
come back on `{reply prefix}/{client_id}` (MQTT v5: CorrelationData; the reply topic is also named,
as v5 ResponseTopic or 3.1.1 `reply_to`, and the gateway refuses any other), numbered, and are
delivered in order with duplicates dropped. The session is persistent (the broker keeps the reply
subscription and queues answers while the device is briefly offline) and paho reconnects by
itself with backoff. Synchronous: paho's network thread
does the I/O, the caller blocks on its answer. Answers are the SDK's types, built from the
protocol's messages (`result` -> ChatCompletion or Completion; `chunk` and `done` -> chunks, the
last with finish_reason and usage); `error` messages raise the SDK's typed errors."""

from __future__ import annotations

import json
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgpack
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .errors import APIConnectionError, APITimeoutError, from_body
from .http_api import trace_headers
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Meta,
)

JSON, MSGPACK = "application/json", "application/msgpack"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
_FINAL = frozenset({"result", "done", "error"})
_SESSION_EXPIRY_S = 300  # how long the broker keeps the reply subscription (and queued answers) of a device gone quiet


class DeviceClient:
    """`broker`: mqtt://host[:port] or mqtts://host[:port]. `protocol`: "5" or "3.1.1".
    `encoding`: "json" or "msgpack". `reply_topic`: `{reply_prefix}/{client_id}`, for a gateway
    whose `[devices] reply_prefix` is not the default `{prefix}/{gateway}/infer/reply`.
    `authorization`: "Bearer KEY_OR_TOKEN", sent with every request (v5 user property, 3.1.1
    payload field) when the gateway has no grant configured for this device."""

    def __init__(self, broker: str, *, gateway: str, client_id: str | None = None, protocol: str = "5",
                 encoding: str = "json", prefix: str = "edge", reply_topic: str | None = None,
                 username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None,
                 keepalive: int = 30, authorization: str | None = None) -> None:
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        parts = urlsplit(broker)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker must be mqtt://host[:port] or mqtts://host[:port], got {broker!r}")
        self.host, self.port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.gateway = gateway
        self.client_id = client_id or "edge-device-" + secrets.token_hex(6)
        self.v5 = protocol == "5"
        self.content_type = JSON if encoding == "json" else MSGPACK
        self.request_topic = f"{prefix}/{gateway}/infer/request/{self.client_id}"
        self.reply_topic = reply_topic or f"{prefix}/{gateway}/infer/reply/{self.client_id}"
        self.keepalive = keepalive
        self._authorization = authorization
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                                 clean_session=None if self.v5 else False)
        if username is not None:
            self._mqtt.username_pw_set(username, password)
        if parts.scheme == "mqtts":
            self._mqtt.tls_set_context(tls or ssl.create_default_context())
        self._mqtt.reconnect_delay_set(1, 10)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_disconnect = self._on_disconnect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message

    # -- connection -----------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> DeviceClient:
        """Connect and subscribe to the reply topic; paho reconnects by itself after that."""
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = _SESSION_EXPIRY_S
        self._mqtt.connect_async(self.host, self.port, self.keepalive, clean_start=False if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                 properties=properties)
        self._mqtt.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise APIConnectionError(f"mqtt://{self.host}:{self.port}: not connected within {timeout:g} s")
        return self

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> DeviceClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.reply_topic, qos=1)  # every time: a broker that lost the session forgot it

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._subscribed.clear()

    # -- the API ------------------------------------------------------------------------

    def chat(self, messages: list[Mapping[str, Any]], *, timeout: float = 60.0, **params: Any) -> ChatCompletion:
        """One chat answer; `params` are the protocol's (model, max_tokens, temperature, top_p,
        top_k, seed, stop, presence_penalty, frequency_penalty, repetition_penalty)."""
        request_id, pending = self._send({"messages": list(messages), **params}, stream=False)
        result = self._final(request_id, pending, timeout)
        return ChatCompletion.parse(_openai(result, request_id, chat=True), self._meta(request_id, result))

    def chat_stream(self, messages: list[Mapping[str, Any]], *, timeout: float = 60.0,
                    **params: Any) -> Iterator[ChatCompletionChunk]:
        """Chunks in order; `timeout` bounds the wait for each next one."""
        request_id, pending = self._send({"messages": list(messages), **params}, stream=True)
        return self._chunks(request_id, pending, timeout, chat=True)

    def complete(self, prompt: str, *, timeout: float = 60.0, **params: Any) -> Completion:
        request_id, pending = self._send({"prompt": prompt, **params}, stream=False)
        result = self._final(request_id, pending, timeout)
        return Completion.parse(_openai(result, request_id, chat=False), self._meta(request_id, result))

    def complete_stream(self, prompt: str, *, timeout: float = 60.0, **params: Any) -> Iterator[CompletionChunk]:
        request_id, pending = self._send({"prompt": prompt, **params}, stream=True)
        return self._chunks(request_id, pending, timeout, chat=False)

    # -- requests -----------------------------------------------------------------------

    def _send(self, fields: dict[str, Any], stream: bool) -> tuple[str, _Pending]:
        request_id = "d-" + secrets.token_hex(8)
        payload = {"id": request_id, **{k: v for k, v in fields.items() if v is not None}}
        if stream:
            payload["stream"] = True
        trace = trace_headers()
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = self.reply_topic
            properties.CorrelationData = request_id.encode()
            properties.ContentType = self.content_type
            pairs = list((trace or {}).items()) + ([("authorization", self._authorization)] if self._authorization else [])
            if pairs:
                properties.UserProperty = pairs
        else:
            payload["reply_to"] = self.reply_topic
            if self._authorization:
                payload["authorization"] = self._authorization
            if trace:
                payload["trace"] = trace
        pending = _Pending()
        with self._lock:
            self._pending[request_id] = pending
        data = json.dumps(payload).encode() if self.content_type == JSON else msgpack.packb(payload, use_bin_type=True)
        info = self._mqtt.publish(self.request_topic, data, qos=1, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # while offline, paho sends it on reconnect
            self._forget(request_id)
            raise APIConnectionError(f"cannot publish the request ({paho.error_string(info.rc)})", gateway=self.gateway)
        return request_id, pending

    def _final(self, request_id: str, pending: _Pending, timeout: float) -> dict[str, Any]:
        try:
            message = self._next(request_id, pending, time.monotonic() + timeout)
        finally:
            self._forget(request_id)
        self._raise_if_error(request_id, message)
        return message

    def _chunks(self, request_id: str, pending: _Pending, timeout: float, chat: bool) -> Iterator[Any]:
        parse = ChatCompletionChunk.parse if chat else CompletionChunk.parse
        try:
            while True:
                message = self._next(request_id, pending, time.monotonic() + timeout)
                self._raise_if_error(request_id, message)
                yield parse(_openai_chunk(message, request_id, chat))
                if message.get("type") in _FINAL:
                    return
        finally:
            self._forget(request_id)

    def _next(self, request_id: str, pending: _Pending, deadline: float) -> dict[str, Any]:
        try:
            return pending.delivered.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise APITimeoutError(f"no answer from gateway {self.gateway!r} in time (request {request_id})",
                                  gateway=self.gateway, may_have_started=True) from None

    def _raise_if_error(self, request_id: str, message: dict[str, Any]) -> None:
        if message.get("type") != "error":
            return
        error = message.get("error") if isinstance(message.get("error"), Mapping) else {}
        status = error.get("status")
        retry_after = error.get("retry_after_s")
        raise from_body(status if isinstance(status, int) and not isinstance(status, bool) else None, {"error": error},
                        request_id=request_id, gateway=self.gateway,
                        retry_after=float(retry_after) if isinstance(retry_after, (int, float)) else None)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def _meta(self, request_id: str, message: dict[str, Any]) -> Meta:
        served_by = message.get("served_by")
        return Meta(self.gateway, request_id, served_by if isinstance(served_by, str) else None)

    # -- answers (paho's network thread) -------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            message = decode(msg.payload, getattr(msg.properties, "ContentType", None) if self.v5 else None)
        except ValueError:
            return  # not ours to understand: nothing waits on it
        request_id = message.get("id")
        correlation = getattr(msg.properties, "CorrelationData", None) if self.v5 else None
        if not isinstance(request_id, str) and isinstance(correlation, bytes):
            request_id = correlation.decode("utf-8", "replace")
        with self._lock:
            pending = self._pending.get(request_id) if isinstance(request_id, str) else None
        if pending is not None:
            pending.accept(message)


class _Pending:
    """One request's answers, put in order: duplicates dropped, early ones held back."""

    def __init__(self) -> None:
        self.delivered: queue.Queue[dict[str, Any]] = queue.Queue()
        self._next = 0
        self._held: dict[int, dict[str, Any]] = {}
        self._ended = False

    def accept(self, message: dict[str, Any]) -> None:
        seq = message.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < self._next or seq in self._held or self._ended:
            return
        self._held[seq] = message
        while self._next in self._held:
            ready = self._held.pop(self._next)
            self._next += 1
            self.delivered.put(ready)
            if ready.get("type") in _FINAL:
                self._ended = True
                return


def _openai(result: dict[str, Any], request_id: str, chat: bool) -> dict[str, Any]:
    """A `result` message in the HTTP API's response shape."""
    text = result.get("text") if isinstance(result.get("text"), str) else ""
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.get("finish_reason")}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": result.get("model"), "choices": [choice], "usage": result.get("usage")}


def _openai_chunk(message: dict[str, Any], request_id: str, chat: bool) -> dict[str, Any]:
    """A `chunk` (its text) or `done` (finish_reason and usage) message as a stream chunk."""
    done = message.get("type") == "done"
    text = message.get("text") if isinstance(message.get("text"), str) else ""
    choice: dict[str, Any] = {"index": 0, "finish_reason": message.get("finish_reason") if done else None}
    choice.update({"delta": {} if done else {"content": text}} if chat else {"text": text})
    chunk = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
             "model": message.get("model"), "choices": [choice]}
    if done:
        chunk["usage"] = message.get("usage")
    return chunk


def decode(payload: bytes, content_type: str | None = None) -> dict[str, Any]:
    """A protocol payload: msgpack or JSON as its v5 content type says, else JSON when its first
    non-blank byte is `{` and msgpack otherwise; ValueError when it is not a map."""
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared in _MSGPACK_TYPES or (declared != JSON and payload.lstrip(b" \t\r\n")[:1] != b"{"):
        try:
            obj = msgpack.unpackb(payload, raw=False)
        except Exception as exc:  # msgpack raises many types
            raise ValueError(f"not msgpack ({type(exc).__name__})") from None
    else:
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a map")
    return obj


__all__ = ["DeviceClient", "decode"]
