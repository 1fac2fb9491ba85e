"""The IoT device front: completion requests published by devices to `{prefix}/{gw}/infer/request`,
answered on the device's reply topic (docs/mqtt-device-protocol.md, the protocol's single source
of truth). A thin front: the payload is parsed into the core's request (the same types and
ranges as the HTTP API's) and answered by the completion service (cache, safety filter, router),
whose events become numbered reply messages.

Replies go to the v5 ResponseTopic (with the request's CorrelationData) or to the payload's
`reply_to`, and only when that topic lies under the configured reply prefix: a device can never
make the gateway publish anywhere else. Every failure a device can cause (malformed payloads,
oversize payloads, bad values, rate limits) is answered with an error payload on its reply
topic when there is one, else logged and counted; nothing a device sends stops the front."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from edge_runtime import tracing

from ..core.errors import SERVER, ApiError, invalid
from ..core.ratelimit import Limits, RateLimiter
from ..core.request import Caller, CompletionRequest
from ..core.router import LOCAL
from ..core.service import CompletionService, Done, TextDelta
from ..mqtt import Message, MessageProperties, MqttClient, MqttError, Topics
from ..mqtt import trace as trace_mqtt
from .schema import parse_device_request

if TYPE_CHECKING:
    from ..config import ProxyConfig
    from ..offload import DevicesConfig, MqttMetrics

log = logging.getLogger("proxy.devices")

JSON, MSGPACK = "application/json", "application/msgpack"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}").fullmatch
MAX_REPLY_TOPIC_BYTES = 256


@dataclass
class _Reply:
    """Where and how to answer one request."""

    topic: str
    correlation: bytes | None
    request_id: str | None
    content_type: str
    seq: itertools.count = dataclasses.field(default_factory=itertools.count)


class DeviceFront:
    def __init__(self, client: MqttClient, topics: Topics, gateway_id: str, config: DevicesConfig,
                 service: CompletionService, proxy: ProxyConfig, metrics: MqttMetrics | None = None) -> None:
        self.client = client
        self.topics = topics
        self.gateway_id = gateway_id
        self.service = service
        self.proxy = proxy
        self.metrics = metrics
        self.request_topic = topics.infer_request(gateway_id)
        self.limiter = RateLimiter(0, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self.configure(config)

    def configure(self, config: DevicesConfig) -> None:
        """Apply `[devices]` (also live: rate limits, defaults and sizes change at once)."""
        self.config = config
        self.reply_prefix = config.reply_prefix or f"{self.topics.prefix}/{self.gateway_id}/infer/reply"
        self.limiter.default = Limits(config.rate_limit_requests_per_min, config.rate_limit_tokens_per_min)

    def start(self) -> list[asyncio.Future[int]]:
        """Subscribe; the future resolves at the broker's acknowledgement."""
        subscribed = [self.client.subscribe(self.request_topic, self._on_request, qos=1)]
        log.info("device front listening", extra={"topic": self.request_topic, "reply_prefix": self.reply_prefix})
        return subscribed

    async def stop(self, grace_s: float = 0.0) -> None:
        """Take no more requests; let those in flight finish within `grace_s`, then cancel them."""
        self.client.unsubscribe(self.request_topic)
        tasks = list(self._tasks)
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def active(self) -> int:
        return len(self._tasks)

    # -- one request --------------------------------------------------------------------------

    def _on_request(self, message: Message) -> None:
        props = message.properties
        if len(message.payload) > self.config.max_payload_bytes:
            reply = self._reply_to(props.response_topic, props.correlation_data, None, _declared(props.content_type) or JSON)
            self._refuse(reply, "too_large", ApiError(
                413, f"payload of {len(message.payload)} bytes exceeds the limit of {self.config.max_payload_bytes} bytes",
                code="request_too_large"))
            return
        encoding = _declared(props.content_type) or _sniff(message.payload)
        try:
            body = _decode(message.payload, encoding)
        except ValueError as exc:
            reply = self._reply_to(props.response_topic, props.correlation_data, None, JSON)
            self._refuse(reply, "malformed", invalid(None, f"payload is not a {_name(encoding)} map: {exc}", code="invalid_payload"))
            return
        request_id = body.get("id")
        reply_to = props.response_topic or body.get("reply_to")
        id_ok = request_id is None or (isinstance(request_id, str) and _ID(request_id) is not None)
        reply = self._reply_to(reply_to, props.correlation_data, request_id if id_ok else None, encoding)
        if reply is None:
            why = "no_reply_topic" if reply_to is None else "bad_reply_topic"
            log.warning("device request without a usable reply topic dropped",
                        extra={"reason": why, "reply_to": str(reply_to)[:200] if reply_to is not None else None})
            self._count_error(why)
            return
        if not id_ok:
            self._refuse(reply, "invalid", invalid("id", "id must be 1 to 128 of A-Z a-z 0-9 . _ : -"))
            return
        try:
            self.limiter.admit(reply.topic)
        except ApiError as exc:
            self._refuse(reply, "rate_limited", exc)
            return
        if len(self._tasks) >= self.config.max_concurrent:
            self._refuse(reply, "busy", ApiError(503, f"the gateway is serving {len(self._tasks)} device requests; retry later",
                                                 type=SERVER, code="device_front_busy", headers={"Retry-After": "1"}))
            return
        try:
            req = self._parse(body)
        except ApiError as exc:
            self._refuse(reply, "invalid", exc)
            return
        trace = trace_mqtt.from_message(props.user_properties, body)
        task = asyncio.get_running_loop().create_task(self._serve(req, reply, trace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _parse(self, body: dict[str, Any]) -> CompletionRequest:
        model = self.service.link.model["id"] if self.service.link.model else "default"
        defaults = {"max_tokens": self.config.default_max_tokens, "temperature": self.config.default_temperature}
        return parse_device_request(body, model, defaults, self.proxy.max_messages, self.proxy.max_prompt_chars)

    async def _serve(self, req: CompletionRequest, reply: _Reply, trace: dict[str, str] | None) -> None:
        served_by = [LOCAL]
        try:
            tracer = tracing.tracer("proxy")
            if tracer is None:
                await self._generate(req, reply, trace, served_by)
            else:
                from opentelemetry.trace import SpanKind

                with tracer.start_as_current_span("mqtt infer", context=tracing.context_of(trace), kind=SpanKind.SERVER,
                                                  attributes={"messaging.destination.name": self.request_topic}):
                    await self._generate(req, reply, tracing.current_trace(), served_by)
        except ApiError as exc:
            self._refuse(reply, "failed" if exc.status >= 500 else "invalid", exc)
            return
        except Exception:
            log.exception("device request failed", extra={"reply_to": reply.topic})
            self._refuse(reply, "failed", ApiError(500, "internal error", type=SERVER, code="internal_error"))
            return
        if self.metrics is not None:
            self.metrics.device_requests.labels("ok").inc()
            self.metrics.route(served_by[0], "mqtt")

    async def _generate(self, req: CompletionRequest, reply: _Reply, trace: dict[str, str] | None,
                        served_by: list[str]) -> None:
        caller = Caller(reply.topic, self.limiter, trace or {}, time.perf_counter(), functools.partial(served_by.__setitem__, 0))
        async with self.service.open(req, caller) as completion:
            async for event in completion.events():
                if isinstance(event, TextDelta):
                    if req.stream and event.text:
                        self._publish(reply, {"type": "chunk", "text": event.text})
                elif isinstance(event, Done):
                    self._finish_reply(reply, req, completion.model, event, served_by[0])

    # -- replies ------------------------------------------------------------------------------

    def _finish_reply(self, reply: _Reply, req: CompletionRequest, model: str, done: Done, served_by: str) -> None:
        usage = {k: int(done.usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        tail = {"finish_reason": done.finish_reason, "usage": usage, "model": model, "served_by": served_by}
        if req.stream:
            self._publish(reply, {"type": "done", **tail})
        else:
            self._publish(reply, {"type": "result", "text": done.text, **tail})

    def _reply_to(self, topic: Any, correlation: bytes | None, request_id: str | None, encoding: str) -> _Reply | None:
        """Where to answer, if `topic` is one the gateway may publish to."""
        if not self._allowed(topic):
            return None
        return _Reply(topic, correlation, request_id, MSGPACK if encoding == MSGPACK else JSON)

    def _allowed(self, topic: Any) -> bool:
        if not isinstance(topic, str) or not topic.startswith(self.reply_prefix + "/"):
            return False
        if len(topic.encode("utf-8", "surrogatepass")) > MAX_REPLY_TOPIC_BYTES:
            return False
        rest = topic[len(self.reply_prefix) + 1:]
        return all(level and not set(level) & {"+", "#", "\x00"} for level in rest.split("/")) and _utf8(topic)

    def _refuse(self, reply: _Reply | None, reason: str, error: ApiError) -> None:
        self._count_error(reason)
        if self.metrics is not None:
            self.metrics.device_requests.labels("error").inc()
        log.info("device request refused", extra={"reason": reason, "code": error.code, "error": error.message,
                                                  "reply_to": reply.topic if reply else None})
        if reply is None:
            return
        body = {"status": error.status, "code": error.code, "message": error.message, "param": error.param}
        retry = error.headers.get("Retry-After")
        if retry is not None:
            body["retry_after_s"] = float(retry)
        self._publish(reply, {"type": "error", "error": body})

    def _publish(self, reply: _Reply, payload: dict[str, Any]) -> None:
        message = {"id": reply.request_id, **payload, "seq": next(reply.seq)} if reply.request_id else {**payload, "seq": next(reply.seq)}
        data = msgpack.packb(message, use_bin_type=True) if reply.content_type == MSGPACK else \
            json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        props = MessageProperties(content_type=reply.content_type, correlation_data=reply.correlation,
                                  payload_utf8=reply.content_type == JSON or None)
        try:
            self.client.publish(reply.topic, data, qos=1, properties=props)
        except MqttError as exc:
            log.warning("device reply not sent", extra={"reply_to": reply.topic, "error": str(exc)})
            self._count_error("reply_not_sent")

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.device_error(reason)


def _declared(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in _MSGPACK_TYPES:
        return MSGPACK
    if kind == JSON:
        return JSON
    return None


def _sniff(payload: bytes) -> str:
    head = payload.lstrip(b" \t\r\n")[:1]
    return JSON if head == b"{" else MSGPACK


def _name(encoding: str) -> str:
    return "JSON" if encoding == JSON else "msgpack"


def _decode(payload: bytes, encoding: str) -> dict[str, Any]:
    if encoding == JSON:
        try:
            obj = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("not UTF-8") from None
        except RecursionError:
            raise ValueError("nested too deeply") from None
        except ValueError as exc:
            raise ValueError(f"invalid JSON ({str(exc)[:80]})") from None
    else:
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_str_len=16 << 20, max_bin_len=16 << 20,
                                  max_array_len=65536, max_map_len=4096)
        except Exception as exc:
            raise ValueError(f"invalid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a {type(obj).__name__}, not a map")
    _check_floats(obj)
    return obj


def _check_floats(obj: Any, depth: int = 0) -> None:
    """Non-finite numbers (JSON's NaN/Infinity extensions, msgpack floats) and deep nesting are refused."""
    if depth > 64:
        raise ValueError("nested too deeply")
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError("non-finite number")
    if isinstance(obj, dict):
        for value in obj.values():
            _check_floats(value, depth + 1)
    elif isinstance(obj, list):
        for value in obj:
            _check_floats(value, depth + 1)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
