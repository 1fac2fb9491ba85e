"""The gateway's side of offload: publish a request to the shared offload topic, and turn the
numbered chunks that come back on this gateway's reply topic into the engine frames of the
answer (ReplyAssembler: reordered, deduplicated, timed out when the cloud goes quiet).

The request travels with MQTT v5 ResponseTopic (our reply topic), CorrelationData (its id) and
MessageExpiryInterval (its deadline), and the same fields in the payload for 3.1.1 brokers.
When the broker connection drops, every offload in flight fails at once (reason `lost`), so
that the router can retry it locally or end it with a clear error.

Requests, cancels and chunks are sealed with the fleet's offload secret (protocol.seal): a chunk
that is not is dropped (counted `unauthenticated`), as is one from any worker but the one whose
`accepted` chunk claimed the request (`other_worker`). Ids carry 128 random bits: nobody can
name a request they have not seen.

Liveness (docs/reliability.md): the gateway follows the workers' presence
(`{prefix}/offload/worker/+`): when a worker's presence is cleared (its Last Will, or its clean
stop), the offloads it claimed, and those not yet claimed by anyone, fail at once (`worker_lost`)
so that the router can move them; each request asks for heartbeats every `peer_timeout_s / 3`, and
a claimed offload whose worker falls silent for `peer_timeout_s` fails (`silent`). Chunks of a
request id given up before its end (moved elsewhere, cancelled, timed out) are dropped (`moved`)."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from edge_runtime.tracing import Trace

from ..mqtt import Message, MessageProperties, MqttClient, MqttError, Topics
from ..mqtt import trace as trace_mqtt
from . import protocol
from .assembler import OffloadFailed, ReplyAssembler
from .config import OffloadConfig
from .metrics import MqttMetrics

log = logging.getLogger("proxy.offload")

MOVED_IDS = 1024  # ids of offloads given up before their end, remembered to tell their late chunks from strangers'
HEARTBEATS_PER_TIMEOUT = 3  # a worker is asked for a heartbeat this many times per peer_timeout_s


class Offloader:
    def __init__(self, client: MqttClient, topics: Topics, gateway_id: str, config: OffloadConfig,
                 metrics: MqttMetrics | None = None, key: bytes | None = None) -> None:
        """`key`: the offload secret (None: messages travel bare, only with `allow_unauthenticated`)."""
        self.client = client
        self.topics = topics
        self.gateway_id = gateway_id
        self.config = config
        self.metrics = metrics
        self.key = key
        self._bare_allowed = key is None and config.allow_unauthenticated  # fixed at start: a push cannot loosen it
        self.reply_topic = topics.offload_reply(gateway_id)
        self.request_topic = topics.offload_request()
        self.cancel_topic = offload_cancel_topic(topics, gateway_id)
        self.presence_topic = topics.offload_presence()
        self._inflight: dict[str, ReplyAssembler] = {}
        self._moved: OrderedDict[str, None] = OrderedDict()
        self._workers: dict[str, tuple[str, str]] = {}  # presence topic -> (state, worker id)
        self.on_worker_online: Callable[[str], None] | None = None  # the router closes the cloud breaker sooner
        self._leaving = False

    def start(self) -> list[asyncio.Future[int]]:
        """Subscribe to the reply topic and the workers' presence (now, and after every
        reconnect; the futures resolve at the broker's acknowledgements); fail offloads in flight
        when the connection drops."""
        subscribed = [self.client.subscribe(self.reply_topic, self._on_reply, qos=1),
                      self.client.subscribe(self.presence_topic, self._on_presence, qos=1)]
        self.client.on_disconnect(self._on_broker_lost)
        return subscribed

    @property
    def available(self) -> bool:
        """Can a request be offloaded now? (broker connected, room for one more)"""
        return ((self.key is not None or self._bare_allowed) and self.client.connected and not self._leaving
                and len(self._inflight) < self.config.max_in_flight)

    @property
    def workers(self) -> dict[str, str]:
        """The workers known by their presence: worker id -> `online` or `draining`."""
        return {worker: state for state, worker in self._workers.values()}

    @property
    def workers_online(self) -> int:
        """Workers whose presence says `online` (retained: known from the first connect on)."""
        return sum(state == protocol.ONLINE for state, _ in self._workers.values())

    @property
    def auth(self) -> str:
        """How its messages are authenticated (telemetry): `hmac`, `none` (allow_unauthenticated),
        or `refused` (no secret: it does not offload)."""
        return "hmac" if self.key is not None else "none" if self._bare_allowed else "refused"

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def offload_id(self, local_id: str) -> str:
        return f"{self.gateway_id}.{secrets.token_hex(16)}.{local_id}"

    async def generate(self, offload_id: str, *, kind: str, model: str, prompt: dict[str, Any], params: dict[str, Any],
                       timeout_s: float, trace: Trace | None = None, tools: Any = None,
                       grammar: Any = None) -> AsyncIterator[dict[str, Any]]:
        """The answer's engine frames (token frames, then done or error). Raises OffloadFailed
        when the cloud cannot be reached or stops answering."""
        if offload_id in self._inflight:
            raise ValueError(f"offload id {offload_id!r} is in use")
        assembler = self._inflight[offload_id] = ReplyAssembler(offload_id)
        if self.metrics is not None:
            self.metrics.offloads_in_flight.set(len(self._inflight))
        v5 = self.client.protocol == "5"
        extra = {"tools": tools, "grammar": grammar, "heartbeat_s": self.heartbeat_s}
        if not v5:
            extra["trace"] = trace  # 3.1.1: the trace context rides in the payload
        try:
            payload = protocol.encode_request(
                request_id=offload_id, gateway=self.gateway_id, reply_to=self.reply_topic, timeout_s=timeout_s,
                kind=kind, model=model, prompt=prompt, params=params, extra=extra)
            properties = MessageProperties(
                content_type=protocol.CONTENT_TYPE, correlation_data=offload_id.encode(), response_topic=self.reply_topic,
                message_expiry_s=max(1, math.ceil(timeout_s)), user_properties=trace_mqtt.to_user_properties(trace))
            if not self.client.connected:
                raise OffloadFailed("unavailable", "the broker is unreachable")
            try:
                published = self.client.publish(self.request_topic, protocol.seal(self.key, self.request_topic, payload), qos=1,
                                                properties=properties)
            except MqttError as exc:  # QueueFull, MqttClosed
                raise OffloadFailed("unavailable", f"the request could not be sent: {exc}") from None
            published.add_done_callback(lambda f: self._check_sent(f, assembler))
            async for frame in assembler.frames(self.config.accept_timeout_s, self.config.idle_timeout_s,
                                                self.config.peer_timeout_s):
                yield frame
        finally:
            self._inflight.pop(offload_id, None)
            if self.metrics is not None:
                self.metrics.offloads_in_flight.set(len(self._inflight))
                if assembler.duplicates:
                    self.metrics.chunks_dropped.labels("duplicate").inc(assembler.duplicates)
                if assembler.strays:
                    self.metrics.chunks_dropped.labels("other_worker").inc(assembler.strays)
                    log.warning("offload chunks from a worker that did not claim the request dropped",
                                extra={"id": offload_id, "worker": assembler.worker, "dropped": assembler.strays})
            if not assembler.finished:
                self._moved[offload_id] = None  # its late chunks are dropped as `moved`
                if len(self._moved) > MOVED_IDS:
                    self._moved.popitem(last=False)
                self.cancel(offload_id)

    @property
    def heartbeat_s(self) -> float:
        return max(protocol.MIN_HEARTBEAT_S, self.config.peer_timeout_s / HEARTBEATS_PER_TIMEOUT)

    def leave(self) -> None:
        """The gateway leaves the broker: offload nothing more, and fail what is in flight now
        (its answer could not arrive), so that the router moves what has not started."""
        self._leaving = True
        for assembler in list(self._inflight.values()):
            assembler.fail(OffloadFailed("lost", "the gateway is leaving the broker (shutting down)"))

    def cancel(self, offload_id: str) -> None:
        """Ask the worker serving `offload_id` to stop (best effort: its answer may still come)."""
        if not self.client.connected:
            return
        try:
            self.client.publish(self.cancel_topic, protocol.seal(self.key, self.cancel_topic,
                                                                 protocol.encode_cancel(offload_id, self.gateway_id)), qos=1)
        except MqttError:
            pass

    async def cancel_async(self, offload_id: str) -> None:
        self.cancel(offload_id)

    # -- replies ------------------------------------------------------------------------------

    def _on_reply(self, message: Message) -> None:
        try:
            request_id, seq, chunk = protocol.parse_chunk(protocol.unseal(self.key, message.topic, message.payload))
        except protocol.Unauthenticated as exc:
            log.warning("unauthenticated offload reply dropped", extra={"topic": message.topic, "error": str(exc)})
            if self.metrics is not None:
                self.metrics.chunks_dropped.labels("unauthenticated").inc()
            return
        except protocol.ProtocolError as exc:
            log.warning("malformed offload reply dropped", extra={"topic": message.topic, "error": str(exc)})
            if self.metrics is not None:
                self.metrics.chunks_dropped.labels("malformed").inc()
            return
        correlation = message.properties.correlation_data
        if correlation is not None and correlation != request_id.encode():
            log.warning("offload reply with mismatched correlation data dropped", extra={"id": request_id})
            if self.metrics is not None:
                self.metrics.chunks_dropped.labels("malformed").inc()
            return
        assembler = self._inflight.get(request_id)
        if assembler is None:  # finished, moved elsewhere, timed out, or another run of this gateway's
            if self.metrics is not None:
                self.metrics.chunks_dropped.labels("moved" if request_id in self._moved else "unknown_request").inc()
            return
        assembler.feed(seq, chunk)

    def _on_presence(self, message: Message) -> None:
        """A worker came, is draining, or is gone (its Will or its clean stop emptied the topic)."""
        try:
            state, worker = protocol.parse_presence(self.key, message.topic, message.payload)
        except protocol.ProtocolError as exc:
            log.warning("bad worker presence dropped", extra={"topic": message.topic, "error": str(exc)})
            return
        known = self._workers.get(message.topic)
        if state != protocol.GONE:
            self._workers[message.topic] = (state, worker)
            if state == protocol.ONLINE and (known is None or known[0] != protocol.ONLINE):
                log.info("cloud worker online", extra={"worker": worker})
                if self.on_worker_online is not None:
                    self.on_worker_online(worker)
            return
        self._workers.pop(message.topic, None)
        if known is None:
            return
        self._worker_gone(known[1], known[0] == protocol.ONLINE, time.monotonic())

    def _worker_gone(self, worker: str, was_taking: bool, now: float) -> None:
        """Fail what the worker claimed and, when it was still taking requests (not draining),
        what nobody claimed yet (it may have been delivered to that worker, which will never
        answer): the router moves them elsewhere."""
        moved = 0
        for assembler in list(self._inflight.values()):
            owner = assembler.owner
            if owner == worker or (was_taking and owner is None and not assembler.finished and assembler.created_at <= now):
                assembler.fail(OffloadFailed("worker_lost", f"the cloud worker {worker} is gone"))
                moved += 1
        log.warning("cloud worker gone", extra={"worker": worker, "offloads_failed": moved})

    def _check_sent(self, published: asyncio.Future[None], assembler: ReplyAssembler) -> None:
        if published.cancelled() or published.exception() is None:
            return
        assembler.fail(OffloadFailed("unavailable", f"the broker did not take the request: {published.exception()}"))

    def _on_broker_lost(self) -> None:
        self._workers.clear()  # learnt again from the retained presence at the next connect
        if self._inflight:
            log.warning("broker connection lost with offloads in flight", extra={"in_flight": len(self._inflight)})
        for assembler in list(self._inflight.values()):
            assembler.fail(OffloadFailed("lost", "the broker connection was lost during the offload"))


def offload_cancel_topic(topics: Topics, gateway_id: str) -> str:
    """Where a gateway asks workers to stop one of its requests (every worker hears it; the one
    serving it stops). `+` for the gateway: the workers' filter. Per gateway so that a broker ACL
    (`pattern write {prefix}/%c/offload/cancel`) vouches for who cancels."""
    return f"{topics.prefix}/{gateway_id}/offload/cancel"
