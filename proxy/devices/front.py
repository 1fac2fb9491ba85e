"""The IoT device front: completion requests published by devices to
`{prefix}/{gw}/infer/request/{device}`, answered on `{reply_prefix}/{device}`
(docs/mqtt-device-protocol.md, the protocol's single source of truth). A thin front: the payload
is parsed into the core's request (the same types and ranges as the HTTP API's) and answered by
the completion service (cache, safety filter, router), whose events become numbered reply messages.

A device is its MQTT client id, which the broker vouches for (the shipped ACL lets a client write
only to the request topic ending in its own id: systemd/mosquitto/acl). Everything follows from
that id and nothing from the payload: the reply topic (a ResponseTopic or `reply_to` naming any
other is refused), the rate-limit bucket and concurrency count, and the grant (models, max_tokens
cap, rate-limit tier) from `[devices] grants`, unless the request carries an API key or JWT
(`authorization`: a v5 user property or a payload field), checked exactly as on HTTP. Every
failure a device can cause is answered with an error payload on its own reply topic; nothing a
device sends stops the front."""

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

from ..auth.keys import Authenticator, Grant
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
AUTHORIZATION = "authorization"  # the v5 user property and the payload field that carry a credential


@dataclass
class _Reply:
    """Where and how to answer one request."""

    device: str
    topic: str
    correlation: bytes | None
    request_id: str | None
    content_type: str
    seq: itertools.count = dataclasses.field(default_factory=itertools.count)

    @property
    def client(self) -> str:
        """What its rate limits and token budget count against."""
        return f"device:{self.device}"


class DeviceFront:
    def __init__(self, client: MqttClient, topics: Topics, gateway_id: str, config: DevicesConfig,
                 service: CompletionService, proxy: ProxyConfig, auth: Authenticator,
                 metrics: MqttMetrics | None = None) -> None:
        self.client = client
        self.topics = topics
        self.gateway_id = gateway_id
        self.service = service
        self.proxy = proxy
        self.auth = auth
        self.metrics = metrics
        self.request_topic = f"{topics.infer_request(gateway_id)}/+"
        self._request_prefix = self.request_topic[:-1]
        self.limiter = RateLimiter(0, 0, proxy.rate_limit_tiers, config.max_devices)
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_device: dict[str, int] = {}  # requests being served, by device (only devices with one)
        self.configure(config)

    def configure(self, config: DevicesConfig) -> None:
        """Apply `[devices]` (also live: rate limits, grants, defaults and sizes change at once)."""
        self.config = config
        self.reply_prefix = config.reply_prefix or f"{self.topics.prefix}/{self.gateway_id}/infer/reply"
        self.limiter.default = Limits(config.rate_limit_requests_per_min, config.rate_limit_tokens_per_min)
        self.limiter.max_clients = config.max_devices

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
        device = message.topic[len(self._request_prefix):]
        if not _ID(device):  # no reply topic can be derived from it: nowhere safe to answer
            log.warning("device request on a topic naming no valid device id dropped", extra={"topic": message.topic[:200]})
            self._count_error("bad_device_id")
            return
        encoding = _declared(props.content_type) or _sniff(message.payload)
        reply = _Reply(device, f"{self.reply_prefix}/{device}", props.correlation_data, None,
                       MSGPACK if encoding == MSGPACK else JSON)
        if len(message.payload) > self.config.max_payload_bytes:
            reply.content_type = _declared(props.content_type) or JSON  # not decoded: answer in the named or default one
            self._refuse(reply, "too_large", ApiError(
                413, f"payload of {len(message.payload)} bytes exceeds the limit of {self.config.max_payload_bytes} bytes",
                code="request_too_large"))
            return
        try:
            body = _decode(message.payload, encoding)
        except ValueError as exc:
            reply.content_type = JSON  # what it sent is not the encoding it named: answer in the default one
            self._refuse(reply, "malformed", invalid(None, f"payload is not a {_name(encoding)} map: {exc}", code="invalid_payload"))
            return
        request_id = body.get("id")
        if request_id is not None and not (isinstance(request_id, str) and _ID(request_id)):
            self._refuse(reply, "invalid", invalid("id", "id must be 1 to 128 of A-Z a-z 0-9 . _ : -"))
            return
        reply.request_id = request_id
        asked = props.response_topic or body.get("reply_to")
        if asked is not None and asked != reply.topic:
            self._refuse(reply, "bad_reply_topic", invalid(
                "reply_to", f"this device's answers go to {reply.topic} (the reply prefix and its client id), not elsewhere",
                code="invalid_reply_topic"))
            return
        try:
            grant = self._grant(device, _credential(props.user_properties, body))
            self.limiter.admit(reply.client, grant.tier)
        except ApiError as exc:
            self._refuse(reply, "rate_limited" if exc.status == 429 else "unauthorized", exc)
            return
        if len(self._tasks) >= self.config.max_concurrent:
            self._refuse(reply, "busy", ApiError(503, f"the gateway is serving {len(self._tasks)} device requests; retry later",
                                                 type=SERVER, code="device_front_busy", headers={"Retry-After": "1"}))
            return
        if self._per_device.get(device, 0) >= self.config.max_concurrent_per_device:
            self._refuse(reply, "rate_limited", ApiError(
                429, f"this device has {self.config.max_concurrent_per_device} requests being served; wait for one to end",
                code="too_many_concurrent_requests", headers={"Retry-After": "1"}))
            return
        try:
            req = grant.authorize(self._parse(body, grant))
        except ApiError as exc:
            self._refuse(reply, "invalid" if exc.status == 400 else "unauthorized", exc)
            return
        trace = trace_mqtt.from_message(props.user_properties, body)
        task = asyncio.get_running_loop().create_task(self._serve(req, reply, trace))
        self._tasks.add(task)
        self._per_device[device] = self._per_device.get(device, 0) + 1
        task.add_done_callback(functools.partial(self._done, device))

    def _done(self, device: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        left = self._per_device.pop(device) - 1
        if left:
            self._per_device[device] = left

    def _grant(self, device: str, credential: str | None) -> Grant:
        """What this device may do: its credential's grant (API key or JWT, as on HTTP), else its
        entry in `[devices] grants`; raises the 401 or 403 ApiError."""
        if credential is not None:
            if not self.auth.enabled:
                raise ApiError(401, "this gateway checks no API keys or tokens; send the request without authorization",
                               type="authentication_error", code="invalid_api_key")
            grant = self.auth.check(credential)
        else:
            configured = self.config.grants.get(device)
            if configured is None and self.config.require_grant:
                raise ApiError(401, f"device {device!r} has no grant on this gateway: send an API key or token in "
                                    f"'{AUTHORIZATION}' ('Bearer ...')", type="authentication_error", code="missing_credential")
            grant = Grant(device) if configured is None else Grant(
                device, None if configured.models is None else frozenset(configured.models), configured.max_tokens,
                configured.tier)
        if grant.tier is not None and grant.tier not in self.limiter.tiers:
            raise ApiError(403, f"rate-limit tier {grant.tier!r} is not configured on this gateway",
                           type="permission_error", code="unknown_tier")
        return grant

    def _parse(self, body: dict[str, Any], grant: Grant) -> CompletionRequest:
        model = self.service.link.model["id"] if self.service.link.model else "default"
        max_tokens = self.config.default_max_tokens  # a grant's cap is also the default, as on HTTP
        if grant.max_tokens is not None:
            max_tokens = min(max_tokens, grant.max_tokens)
        defaults = {"max_tokens": max_tokens, "temperature": self.config.default_temperature}
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
            log.exception("device request failed", extra={"device": reply.device})
            self._refuse(reply, "failed", ApiError(500, "internal error", type=SERVER, code="internal_error"))
            return
        if self.metrics is not None:
            self.metrics.device_requests.labels("ok").inc()
            self.metrics.route(served_by[0], "mqtt")

    async def _generate(self, req: CompletionRequest, reply: _Reply, trace: dict[str, str] | None,
                        served_by: list[str]) -> None:
        caller = Caller(reply.client, self.limiter, trace or {}, time.perf_counter(), functools.partial(served_by.__setitem__, 0))
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

    def _refuse(self, reply: _Reply, reason: str, error: ApiError) -> None:
        self._count_error(reason)
        if self.metrics is not None:
            self.metrics.device_requests.labels("error").inc()
        log.info("device request refused", extra={"reason": reason, "code": error.code, "error": error.message,
                                                  "device": reply.device})
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
            log.warning("device reply not sent", extra={"device": reply.device, "error": str(exc)})
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


def _credential(user_properties: tuple[tuple[str, str], ...], body: dict[str, Any]) -> str | None:
    """The `Authorization` value of a request: a v5 user property, else the payload field (3.1.1)."""
    for name, value in user_properties:
        if name.lower() == AUTHORIZATION:
            return value
    value = body.get(AUTHORIZATION)
    if value is not None and not isinstance(value, str):
        raise invalid(AUTHORIZATION, f"{AUTHORIZATION} must be a string ('Bearer ...')")
    return value
