"""The cloud worker (`edge-proxy --role cloud`): takes offloaded requests from the shared
subscription `$share/{group}/{prefix}/offload/request`, so that any number of workers share
the load, and streams each answer back as numbered chunks to the gateway's reply topic.

It serves with its own engine (EngineBackend, the engine socket) or by forwarding to any
OpenAI-compatible upstream (UpstreamBackend: vLLM, TGI, another of our sidecars). Requests whose
deadline has passed are refused (`expired`) rather than worked on; past `max_concurrent` they
are refused `busy`, so that the gateway serves them some other way.

With the fleet's offload secret (protocol.seal) a request, or a cancel, that is not sealed with
it is dropped unanswered. The answer goes only to `{prefix}/{gw}/offload/reply` of the gateway
the request names (a reply topic naming any other is refused: a request cannot make a worker
publish elsewhere), and only a cancel on that gateway's own cancel topic stops it.

Liveness (docs/reliability.md): the worker keeps a retained presence on
`{prefix}/offload/worker/{name}` (its MQTT user name, else its client id; `online`, then
`draining` when it stops) whose Last Will
empties it, so that gateways fail over its requests as soon as the broker notices it is gone; a
request that asks for heartbeats gets one whenever nothing else was sent for `heartbeat_s`. A
request id is served once: a redelivery of one served or being served is ignored."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import msgspec

from edge_runtime.client import EngineError
from edge_wire.frames import BUSY, INTERNAL, INVALID_REQUEST
from edge_wire.settings import ConfigError

from ..core.engine_link import EngineLink
from ..core.errors import ApiError
from ..mqtt import Message, MessageProperties, MqttClient, MqttError, OutMessage, QueueFull, Topics
from ..mqtt import trace as trace_mqtt
from ..mqtt.topics import check_name
from . import protocol
from .config import CloudConfig
from .gateway import offload_cancel_topic
from .metrics import MqttMetrics

log = logging.getLogger("proxy.cloud")

DEFAULT_TIMEOUT_S = 120.0  # a request that names no deadline at all
UNAVAILABLE = "unavailable"
SEEN_IDS = 8192  # request ids remembered (served or serving) so that none is run twice


class Backend(Protocol):
    name: str

    def generate(self, request: protocol.OffloadRequest, request_id: str, timeout_s: float,
                 trace: dict[str, str] | None) -> AsyncIterator[dict[str, Any]]: ...

    async def close(self) -> None: ...


class EngineBackend:
    """This worker's own engine daemon, over the sidecar's EngineLink."""

    name = "engine"

    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self._ids = itertools.count(1)

    async def generate(self, request: protocol.OffloadRequest, request_id: str, timeout_s: float,
                       trace: dict[str, str] | None) -> AsyncIterator[dict[str, Any]]:
        try:
            engine = await self.link.client()
        except ApiError:
            yield protocol.error_frame(UNAVAILABLE, "the cloud worker's engine is unreachable")
            return
        frames = engine.generate(**request.prompt_fields(), params=msgspec.to_builtins(request.params), timeout_s=timeout_s,
                                 trace=trace, id=f"w{next(self._ids)}", **request.structured())
        async with contextlib.aclosing(frames):
            try:
                async for frame in frames:
                    yield frame
            except EngineError as exc:
                yield protocol.error_frame(exc.code, exc.message, exc.param, exc.estimated_wait_s)

    async def close(self) -> None:
        pass


class UpstreamBackend:
    """An OpenAI-compatible server: the request becomes a streaming /chat/completions (or
    /completions) call, and its SSE chunks become engine frames."""

    name = "upstream"

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self._session: aiohttp.ClientSession | None = None

    async def generate(self, request: protocol.OffloadRequest, request_id: str, timeout_s: float,
                       trace: dict[str, str] | None) -> AsyncIterator[dict[str, Any]]:
        if request.structured():
            yield protocol.error_frame(INVALID_REQUEST, "tools and response_format are not supported by this worker's upstream",
                                       "tools")
            return
        chat = request.kind == "chat"
        body: dict[str, Any] = {"model": self.model or request.model or "default", "stream": True,
                                "stream_options": {"include_usage": True}, **_openai_params(msgspec.to_builtins(request.params))}
        prompt = request.prompt_fields()
        if "messages" in prompt:
            body["messages"] = prompt["messages"]
        elif chat:
            yield protocol.error_frame(INVALID_REQUEST, "a chat request needs messages", "messages")
            return
        else:
            body["prompt"] = prompt.get("prompt", prompt.get("prompt_ids"))
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if trace:
            headers.update(trace)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{self.base_url}/{'chat/completions' if chat else 'completions'}"
        finish, usage = None, None
        try:
            async with self._session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    yield _upstream_error(r.status, await r.read())
                    return
                async for data in _sse(r.content):
                    if data == b"[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if isinstance(chunk.get("error"), dict):
                        yield protocol.error_frame(INTERNAL, f"the upstream failed: {chunk['error'].get('message')}")
                        return
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if text:
                            yield {"type": "token", "text": text, "token_id": -1}
                        finish = choice.get("finish_reason") or finish
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            yield protocol.error_frame(UNAVAILABLE, f"the upstream is unreachable ({type(exc).__name__})")
            return
        usage = usage or {}
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        yield {"type": "done", "finish_reason": finish or "stop",
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class CloudWorker:
    def __init__(self, client: MqttClient, topics: Topics, config: CloudConfig, backend: Backend,
                 metrics: MqttMetrics | None = None, worker_id: str | None = None, key: bytes | None = None,
                 presence_name: str | None = None) -> None:
        """`key`: the offload secret (None: bare messages, only with `allow_unauthenticated`);
        `presence_name`: its presence topic's last level (default the client id; its MQTT user
        name where it has one, which is what a broker ACL knows it by)."""
        self.client = client
        self.topics = topics
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.key = key
        self.worker_id = worker_id or f"{socket.gethostname()}-{client.client_id}"
        self.subscription = topics.offload_request(config.share_group)
        self.presence_topic = topics.offload_presence(presence_name or client.client_id)
        self._active: dict[str, tuple[str, asyncio.Task[None]]] = {}  # request id -> (its gateway, its task)
        self._seen: OrderedDict[str, float] = OrderedDict()  # request id -> its deadline (monotonic), oldest first
        self._state = protocol.ONLINE
        self.served = 0
        # The broker empties the presence topic when this worker's connection dies.
        client.will = self._gone()
        client.on_connect(self._announce)

    def start(self) -> list[asyncio.Future[int]]:
        """Subscribe; the futures resolve at the broker's acknowledgements."""
        subscribed = [self.client.subscribe(self.subscription, self._on_request, qos=1),
                      self.client.subscribe(offload_cancel_topic(self.topics, "+"), self._on_cancel, qos=1)]
        log.info("cloud worker subscribed", extra={"filter": self.subscription, "backend": self.backend.name})
        asyncio.gather(*subscribed).add_done_callback(self._acknowledged)
        return subscribed

    def _acknowledged(self, subscribed: asyncio.Future[list[int]]) -> None:
        """From the broker's SUBACKs on, requests reach this worker (a refusal is logged by the client)."""
        if not subscribed.cancelled() and subscribed.exception() is None:
            log.info("cloud worker subscriptions acknowledged", extra={"filter": self.subscription})

    async def stop(self, grace_s: float = 0.0) -> None:
        """Say `draining`, take no more requests; let those being served finish within
        `grace_s`, then cancel the rest (their gateways get a `cancelled` ending). From here a
        lost connection is final: a successor with the same client id is not fought."""
        self._state = protocol.DRAINING
        self.client.reconnect = False
        if self.client.connected:
            self._announce()
        self.client.unsubscribe(self.subscription)
        tasks = [task for _, task in self._active.values()]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.close()

    def farewell(self) -> list[OutMessage]:
        """The last word at a clean stop: the presence topic emptied (gone), as the Will would."""
        return [self._gone()]

    def _gone(self) -> OutMessage:
        """The presence topic emptied: what the Will and a clean stop both publish."""
        return OutMessage(self.presence_topic, b"", qos=1, retain=True)

    def _announce(self) -> None:
        payload = protocol.presence_payload(self._state, self.worker_id)
        with contextlib.suppress(MqttError):
            self.client.publish(self.presence_topic, protocol.seal(self.key, self.presence_topic, payload), qos=1, retain=True)

    @property
    def active(self) -> int:
        return len(self._active)

    # -- requests -----------------------------------------------------------------------------

    def _on_request(self, message: Message) -> None:
        props = message.properties
        try:
            raw = protocol.unseal(self.key, message.topic, message.payload)
        except protocol.ProtocolError as exc:  # nothing is sent in answer: its gateway, if any, is not known
            outcome = "unauthenticated" if isinstance(exc, protocol.Unauthenticated) else "rejected"
            log.warning("offload request dropped", extra={"outcome": outcome, "error": str(exc)})
            self._count(outcome)
            return
        # Where to answer and with which id, learned before the rest is checked: errors go there too.
        gateway = raw.get("gateway")
        reply_to = self._reply_topic(gateway)
        asked = props.response_topic or raw.get("reply_to")
        if reply_to is None or (asked is not None and asked != reply_to):
            log.warning("offload request whose reply topic is not its gateway's dropped",
                        extra={"gateway": str(gateway)[:80], "reply_to": str(asked)[:200]})
            self._count("rejected")
            return
        request_id = raw.get("id") if protocol.valid_id(raw.get("id")) else _text_id(props.correlation_data)
        try:
            request = protocol.parse_request(raw)
        except protocol.ProtocolError as exc:
            self._refuse(reply_to, request_id, "rejected", INVALID_REQUEST, f"bad request: {exc}")
            return
        remaining = self._remaining_s(props.message_expiry_s, request)
        if remaining <= 0:
            self._refuse(reply_to, request_id, "expired", protocol.EXPIRED, "the request's deadline passed before a worker took it")
            return
        if request_id in self._active or request_id in self._seen:
            return  # a redelivery (QoS 1) of a request served or being served: never run twice
        if len(self._active) >= self.config.max_concurrent:
            self._refuse(reply_to, request_id, "busy", BUSY, f"the cloud worker is serving {len(self._active)} requests",
                         estimated_wait_s=1.0)
            return
        trace = trace_mqtt.from_message(props.user_properties, raw)
        self._remember(request_id, remaining)
        task = asyncio.get_running_loop().create_task(self._serve(request, request_id, reply_to, remaining, trace))
        self._active[request_id] = (gateway, task)
        if self.metrics is not None:
            self.metrics.cloud_in_flight.set(len(self._active))
        task.add_done_callback(lambda _: self._finished(request_id))

    def _on_cancel(self, message: Message) -> None:
        """Stop a request, when the cancel is sealed and comes from its own gateway's cancel topic."""
        gateway = message.topic[len(self.topics.prefix) + 1:].split("/", 1)[0]
        try:
            cancel = protocol.unseal(self.key, message.topic, message.payload)
        except protocol.ProtocolError as exc:
            log.warning("unauthenticated offload cancel ignored", extra={"gateway": gateway[:80], "error": str(exc)})
            return
        active = self._active.get(cancel.get("id")) if isinstance(cancel.get("id"), str) else None
        if active is None:
            return
        if active[0] != gateway or cancel.get("gateway") != gateway:
            log.warning("offload cancel from another gateway ignored", extra={"id": cancel["id"], "from": gateway[:80]})
            return
        active[1].cancel()

    def _remember(self, request_id: str, remaining_s: float) -> None:
        """Note a request id taken, until its deadline (a redelivery after that is refused `expired`)."""
        now = time.monotonic()
        while self._seen and (len(self._seen) >= SEEN_IDS or next(iter(self._seen.values())) < now):
            self._seen.popitem(last=False)
        self._seen[request_id] = now + remaining_s + 1.0

    async def _serve(self, request: protocol.OffloadRequest, request_id: str, reply_to: str, timeout_s: float,
                     trace: dict[str, str] | None) -> None:
        numbers = itertools.count(1)
        sent = _Sent()
        outcome = "failed"
        beat = None
        try:
            self._publish(reply_to, request_id, protocol.accepted_chunk(request_id, self.worker_id, request.heartbeat_s))
            sent.at = time.monotonic()
            if request.heartbeat_s is not None:
                beat = asyncio.get_running_loop().create_task(self._heartbeats(reply_to, request_id, request.heartbeat_s, sent))
            async with asyncio.timeout(timeout_s + 1.0):
                async with contextlib.aclosing(self.backend.generate(request, request_id, timeout_s, trace)) as frames:
                    async for frame in frames:
                        number = next(numbers)
                        await self._send(reply_to, request_id, protocol.encode_chunk(request_id, number, frame, self.worker_id))
                        sent.seq, sent.at = number, time.monotonic()  # (once queued: a heartbeat names only chunks sent)
                        if frame.get("type") == protocol.DONE:
                            outcome = "served"
                            return
                        if frame.get("type") == protocol.ERROR:
                            return
            self._publish(reply_to, request_id, protocol.encode_chunk(
                request_id, next(numbers), protocol.error_frame(INTERNAL, "the answer ended without a done frame"), self.worker_id))
        except asyncio.CancelledError:  # the gateway cancelled it, or this worker is stopping
            outcome = "cancelled"
            with contextlib.suppress(MqttError):
                self._publish(reply_to, request_id, protocol.encode_chunk(request_id, next(numbers), {
                    "type": "done", "finish_reason": "cancelled",
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}, self.worker_id))
            raise
        except TimeoutError:
            with contextlib.suppress(MqttError):
                self._publish(reply_to, request_id, protocol.encode_chunk(request_id, next(numbers), {
                    "type": "done", "finish_reason": "deadline",
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}, self.worker_id))
        except MqttError as exc:  # the queue to the broker is full, or the client stopped
            log.warning("offload answer abandoned: cannot publish", extra={"id": request_id, "error": str(exc)})
        except Exception:
            log.exception("offload request failed", extra={"id": request_id})
            with contextlib.suppress(MqttError):
                self._publish(reply_to, request_id, protocol.encode_chunk(
                    request_id, next(numbers), protocol.error_frame(INTERNAL, "the cloud worker failed"), self.worker_id))
        finally:
            if beat is not None:
                beat.cancel()
            self._count(outcome)
            if outcome == "served":
                self.served += 1

    async def _heartbeats(self, reply_to: str, request_id: str, every_s: float, sent: _Sent) -> None:
        """A heartbeat whenever nothing was sent for `every_s` (tokens are heartbeats enough)."""
        while True:
            wait = sent.at + every_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            with contextlib.suppress(MqttError):
                self._publish(reply_to, request_id, protocol.heartbeat_chunk(request_id, sent.seq, self.worker_id))
            sent.at = time.monotonic()

    def _finished(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        if self.metrics is not None:
            self.metrics.cloud_in_flight.set(len(self._active))

    # -- helpers ------------------------------------------------------------------------------

    def _publish(self, reply_to: str, request_id: str, payload: bytes) -> asyncio.Future[None]:
        props = MessageProperties(content_type=protocol.CONTENT_TYPE, correlation_data=request_id.encode())
        return self.client.publish(reply_to, protocol.seal(self.key, reply_to, payload), qos=1, properties=props)

    async def _send(self, reply_to: str, request_id: str, payload: bytes) -> None:
        """Publish a chunk; wait for the broker when half the outbound queue is in use."""
        while True:
            try:
                published = self._publish(reply_to, request_id, payload)
                break
            except QueueFull:
                await asyncio.sleep(0.05)
        if self.client.queued * 2 >= self.client.config.max_queued:
            await published

    def _refuse(self, reply_to: str | None, request_id: str | None, outcome: str, code: str, message: str,
                estimated_wait_s: float | None = None) -> None:
        self._count(outcome)
        log.info("offload request refused", extra={"id": request_id, "code": code, "reason": message})
        if request_id is None or reply_to is None:
            return
        frame = protocol.error_frame(code, message, estimated_wait_s=estimated_wait_s)
        try:
            self._publish(reply_to, request_id, protocol.encode_chunk(request_id, 0, frame, self.worker_id))
        except MqttError:
            pass

    def _reply_topic(self, gateway: Any) -> str | None:
        """`{prefix}/{gw}/offload/reply` of a valid gateway id; None for anything else."""
        try:
            return self.topics.offload_reply(check_name("gateway", gateway))
        except ConfigError:
            return None

    @staticmethod
    def _remaining_s(expiry_s: int | None, request: protocol.OffloadRequest) -> float:
        """Seconds left to the request's deadline: the broker's countdown (v5 message expiry)
        when present, else the payload's deadline (3.1.1: needs synchronised clocks), else its
        timeout."""
        timeout = request.timeout_s or DEFAULT_TIMEOUT_S
        if expiry_s is not None:
            return min(float(expiry_s), timeout)
        if request.deadline is not None:
            return min(request.deadline - time.time(), timeout)
        return timeout

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.cloud_requests.labels(outcome).inc()


class _Sent:
    """The last chunk sent for one request: its number, and when (monotonic)."""

    seq = 0
    at = 0.0


def _text_id(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    return text if protocol.valid_id(text) else None


_OPENAI_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty")


def _openai_params(params: dict[str, Any]) -> dict[str, Any]:
    """The engine's sampling params as OpenAI request fields (vLLM's names for the extensions)."""
    body = {key: params[key] for key in _OPENAI_KEYS if params.get(key) is not None}
    if params.get("top_k"):
        body["top_k"] = params["top_k"]
    if params.get("repetition_penalty") not in (None, 1.0):
        body["repetition_penalty"] = params["repetition_penalty"]
    if params.get("ignore_eos"):
        body["ignore_eos"] = True
    return body


def _upstream_error(status: int, raw: bytes) -> dict[str, Any]:
    try:
        error = json.loads(raw).get("error") or {}
        message = str(error.get("message") or raw[:200])
        param = error.get("param") if isinstance(error.get("param"), str) else None
    except (ValueError, AttributeError):
        message, param = raw[:200].decode(errors="replace"), None
    if status in (400, 404, 413, 422):
        return protocol.error_frame(INVALID_REQUEST, message, param)
    if status in (429, 503):
        return protocol.error_frame(BUSY, f"the upstream is busy: {message}", estimated_wait_s=1.0)
    if status in (502, 504):
        return protocol.error_frame(UNAVAILABLE, f"the upstream failed ({status})")
    return protocol.error_frame(INTERNAL, f"the upstream failed ({status}): {message}")


async def _sse(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The data fields of a server-sent event stream."""
    async for line in content:
        line = line.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()
