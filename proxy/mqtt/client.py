"""MqttClient: one broker connection for asyncio, on paho-mqtt 2.x driven by the event loop.

paho does the protocol; this class does the life around it: connecting (MQTT v5, or 3.1.1 when
the broker refuses v5), reconnecting with exponential backoff and jitter, subscribing again on
every connect (so retained messages, such as a desired config, are delivered again), the Last
Will, and a bounded outbound queue. Publishes made while disconnected wait in that queue;
unacknowledged QoS 1/2 publishes are resent by paho on the next connect of the same session.

Threads: everything runs on the event loop except the blocking part of connecting (DNS, TCP,
TLS handshake), which runs in a worker thread with the socket callbacks detached, so that paho
never calls back into the loop from that thread."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_wire.settings import ConfigError

from .config import MqttConfig

log = logging.getLogger("proxy.mqtt")

_UNSUPPORTED_PROTOCOL = 0x84  # CONNACK reason code; paho maps a 3.1.1 broker's "unacceptable protocol version" to it
_MISC_PERIOD_S = 1.0  # how often paho's keepalive bookkeeping runs (at most; less with a short keepalive)


class MqttError(Exception):
    """A publish or subscribe the broker (or the connection) could not carry."""


class QueueFull(MqttError):
    """max_queued messages are already waiting for the broker."""


class MqttClosed(MqttError):
    """The client was stopped before the message could be delivered."""


@dataclass(frozen=True)
class MessageProperties:
    """The MQTT v5 publish properties used here (dropped on a 3.1.1 connection)."""

    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    message_expiry_s: int | None = None
    payload_utf8: bool | None = None  # the payload format indicator

    def to_paho(self, packet_type: int) -> Properties:
        props = Properties(packet_type)
        if self.content_type is not None:
            props.ContentType = self.content_type
        if self.correlation_data is not None:
            props.CorrelationData = self.correlation_data
        if self.response_topic is not None:
            props.ResponseTopic = self.response_topic
        if self.user_properties:
            props.UserProperty = list(self.user_properties)
        if self.message_expiry_s is not None:
            props.MessageExpiryInterval = self.message_expiry_s
        if self.payload_utf8 is not None:
            props.PayloadFormatIndicator = int(self.payload_utf8)
        return props

    @classmethod
    def from_paho(cls, props: Properties | None) -> MessageProperties:
        if props is None:
            return _NO_PROPERTIES
        indicator = getattr(props, "PayloadFormatIndicator", None)
        return cls(
            content_type=getattr(props, "ContentType", None),
            correlation_data=getattr(props, "CorrelationData", None),
            response_topic=getattr(props, "ResponseTopic", None),
            user_properties=tuple(tuple(p) for p in getattr(props, "UserProperty", ())),
            message_expiry_s=getattr(props, "MessageExpiryInterval", None),
            payload_utf8=None if indicator is None else bool(indicator),
        )


_NO_PROPERTIES = MessageProperties()


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: MessageProperties = _NO_PROPERTIES


@dataclass(frozen=True)
class OutMessage:
    """A message to publish later: a Last Will, or a final word at a clean stop."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    properties: MessageProperties | None = None


Handler = Callable[[Message], Awaitable[None] | None]
Hook = Callable[[], Awaitable[None] | None]


@dataclass
class _Pending:
    message: OutMessage
    future: asyncio.Future[None]


@dataclass
class _Subscription:
    qos: int
    match: str  # the filter messages are matched against ($share/{group}/ stripped)
    handlers: list[Handler]


class _ConnectFailed(Exception):
    pass


class _FallBack(_ConnectFailed):
    """The broker refused MQTT v5: try again at once with 3.1.1."""


class MqttClient:
    def __init__(self, config: MqttConfig, client_id: str, *, will: OutMessage | None = None) -> None:
        self.config = config
        self.client_id = client_id
        self.will = will
        self._address = config.address
        self._ssl_context = _ssl_context(config) if self._address.tls else None
        self._protocol = "3.1.1" if config.protocol == "3.1.1" else "5"
        self._paho: paho.Client | None = None
        self._subs: dict[str, _Subscription] = {}
        self._suback: dict[int, tuple[str, tuple[asyncio.Future[int], ...]]] = {}  # SUBACK waiters by mid
        self._first_suback: dict[str, list[asyncio.Future[int]]] = {}  # subscribed while disconnected
        self._queue: deque[_Pending] = deque()  # not yet handed to paho
        self._unacked: dict[int, _Pending] = {}  # handed to paho, awaiting PUBACK/PUBCOMP (by mid)
        self._connect_hooks: list[Hook] = []
        self._disconnect_hooks: list[Hook] = []
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # stop() began: a lost connection is expected, not to be retried
        self._closed = False
        self.reconnect = True  # False: a lost connection is final (an instance that is draining must not fight its successor)
        self.connects = 0  # successful connects since start (telemetry)

    # -- public -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        """"5" or "3.1.1": the protocol of the current (or next) connection."""
        return self._protocol

    @property
    def queued(self) -> int:
        """Messages waiting for the broker: queued, or sent and not yet acknowledged."""
        return len(self._queue) + len(self._unacked)

    def on_connect(self, hook: Hook) -> None:
        """Run `hook` after every connect, once the subscriptions are renewed and the queue handed on."""
        self._connect_hooks.append(hook)

    def on_disconnect(self, hook: Hook) -> None:
        self._disconnect_hooks.append(hook)

    async def start(self) -> None:
        """Begin connecting in the background (returns at once; see wait_connected)."""
        if self._task is not None:
            raise RuntimeError("MqttClient already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mqtt:{self.client_id}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> asyncio.Future[int]:
        """Deliver messages matching `topic_filter` to `handler` (plain or async), now and after
        every reconnect. Several handlers may share a filter; each subscribe is sent to the broker
        again, so the new handler gets the retained messages too. The future resolves with the
        granted QoS at the SUBACK."""
        _check_qos(qos)
        sub = self._subs.get(topic_filter)
        if sub is None:
            match = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
            sub = self._subs[topic_filter] = _Subscription(qos, match, [])
        sub.qos = max(sub.qos, qos)
        sub.handlers.append(handler)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.connected and self._paho is not None:
            self._send_subscribe(self._paho, topic_filter, future)
        else:
            self._first_suback.setdefault(topic_filter, []).append(future)
        return future

    def unsubscribe(self, topic_filter: str, handler: Handler | None = None) -> None:
        """Stop delivering to `handler` (None: to every handler of the filter); the broker is
        told once no handler is left."""
        sub = self._subs.get(topic_filter)
        if sub is None:
            return
        sub.handlers = [h for h in sub.handlers if handler is not None and h != handler]
        if not sub.handlers:
            del self._subs[topic_filter]
            for future in self._first_suback.pop(topic_filter, []):
                future.cancel()
            if self.connected and self._paho is not None:
                self._paho.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> asyncio.Future[None]:
        """Send a message; the future resolves when QoS 0 is handed to the socket, or when the
        broker acknowledged QoS 1/2. Raises QueueFull when max_queued messages are waiting."""
        if self._closed:
            raise MqttClosed("the MQTT client is stopped")
        _check_qos(qos)
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to topic {topic!r}")
        if self.queued >= self.config.max_queued:
            raise QueueFull(f"{self.queued} messages already wait for the broker (max_queued)")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # fire-and-forget is fine: failures are logged here
        item = _Pending(OutMessage(topic, data, qos, retain, properties), future)
        if self.connected and not self._queue and self._paho is not None:
            self._hand(self._paho, item)
        else:
            self._queue.append(item)
        return item.future

    async def stop(self, final: Iterable[OutMessage] = (), timeout: float = 5.0) -> None:
        """Publish `final` (e.g. a retained "offline"), let queued messages reach the broker
        within `timeout`, disconnect cleanly (so the broker drops the Last Will), and stop.
        What the broker has not acknowledged by then fails with MqttClosed."""
        if self._stopping:
            return
        self._stopping = True
        if self.connected and self._paho is not None:
            for message in final:
                self.publish(message.topic, message.payload, message.qos, message.retain, message.properties)
            waiting = [p.future for p in [*self._queue, *self._unacked.values()]]
            if waiting:
                await asyncio.wait(waiting, timeout=timeout)
            lost = self._lost
            self._paho.disconnect()
            if lost is not None:
                await asyncio.wait([lost], timeout=timeout)
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._paho is not None:
            self._drop_socket(self._paho)
        for item in [*self._queue, *self._unacked.values()]:
            if not item.future.done():
                item.future.set_exception(MqttClosed("the MQTT client stopped before the broker acknowledged"))
        self._queue.clear()
        self._unacked.clear()
        for future in [*(f for fs in self._first_suback.values() for f in fs), *(f for _, fs in self._suback.values() for f in fs)]:
            future.cancel()
        for task in list(self._handler_tasks):
            task.cancel()
        await asyncio.gather(*self._handler_tasks, return_exceptions=True)

    # -- the connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
                if self._stopping or not self.reconnect:
                    return
            except _FallBack:
                continue
            except _ConnectFailed as exc:
                if not self.reconnect:
                    return
                failures += 1
                log.warning("broker connection failed", extra={"broker": self._broker, "error": str(exc), "attempt": failures})
            delay = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2 ** max(failures - 1, 0))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: a fleet must not reconnect in step

    async def _session(self) -> None:
        """One connection: connect, serve until it is lost. Raises _ConnectFailed if it never came up."""
        if self._paho is None:
            self._paho = self._new_paho()
        client = self._paho
        loop = asyncio.get_running_loop()
        self._detach(client)
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        opening = asyncio.ensure_future(asyncio.to_thread(self._open, client))
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(lambda _: self._abandon(opening, client))  # the thread cannot be interrupted
            raise
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS failure, bad host name
            raise _ConnectFailed(f"cannot connect: {exc}") from None
        if client.socket() is None:
            raise _ConnectFailed("cannot connect: no socket")
        self._attach(client)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                reason = await asyncio.shield(self._connack)
        except TimeoutError:
            self._drop_socket(client)
            raise _ConnectFailed(f"no CONNACK within {self.config.connect_timeout_s:g} s") from None
        except _ConnectFailed:
            self._drop_socket(client)
            raise
        if reason.is_failure:
            self._drop_socket(client)
            if reason.value == _UNSUPPORTED_PROTOCOL and self.config.protocol == "auto" and self._protocol == "5":
                log.info("broker refuses MQTT v5; using 3.1.1", extra={"broker": self._broker})
                self._fall_back()
                raise _FallBack()
            raise _ConnectFailed(f"broker refused the connection: {reason}")
        await self._serve(client)

    async def _serve(self, client: paho.Client) -> None:
        assert self._lost is not None
        self.connects += 1
        log.info("connected to the broker", extra={"broker": self._broker, "protocol": self._protocol, "client_id": self.client_id})
        self._connected.set()
        try:
            for topic_filter in self._subs:
                self._send_subscribe(client, topic_filter, *self._first_suback.pop(topic_filter, []))
            while self._queue and not self._lost.done():
                self._hand(client, self._queue.popleft())
            for hook in self._connect_hooks:
                await _call(hook, "connect hook")
            await asyncio.shield(self._lost)
        finally:
            self._connected.clear()
            for topic_filter, futures in self._suback.values():  # their SUBACK will come after the next connect
                if topic_filter in self._subs:
                    self._first_suback.setdefault(topic_filter, []).extend(futures)
            self._suback.clear()
            if not self._stopping:
                log.warning("lost the broker connection", extra={"broker": self._broker})
                for hook in self._disconnect_hooks:
                    await _call(hook, "disconnect hook")

    def _open(self, client: paho.Client) -> None:
        """Worker thread: TCP (+TLS) connect and send CONNECT."""
        host, port, keepalive = self._address.host, self._address.port, self.config.keepalive_s
        if self._protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            # The broker must not send us more than this: an oversize publish is dropped there,
            # never read into memory here (paho would take up to 256 MiB).
            props.MaximumPacketSize = self.config.max_packet_bytes
            if self.config.session_expiry_s:
                props.SessionExpiryInterval = self.config.session_expiry_s
            client.connect(host, port, keepalive, clean_start=self.config.session_expiry_s == 0, properties=props)
        else:
            client.connect(host, port, keepalive)

    def _new_paho(self) -> paho.Client:
        v5 = self._protocol == "5"
        kwargs: dict[str, Any] = {"clean_session": self.config.session_expiry_s == 0} if not v5 else {}
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            reconnect_on_failure=False, **kwargs,
        )
        client.connect_timeout = self.config.connect_timeout_s
        client.max_queued_messages_set(0)  # bounded here, by max_queued
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
            client.tls_insecure_set(self.config.tls_insecure)
        if self.will is not None:
            w = self.will
            props = w.properties.to_paho(PacketTypes.WILLMESSAGE) if v5 and w.properties else None
            client.will_set(w.topic, w.payload, w.qos, w.retain, properties=props)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _fall_back(self) -> None:
        """Use MQTT 3.1.1 from now on: a new paho client; what the old one held goes first."""
        self._protocol = "3.1.1"
        self._paho = None
        self._queue.extendleft(reversed(list(self._unacked.values())))
        self._unacked.clear()

    @property
    def _broker(self) -> str:
        return f"{'mqtts' if self._address.tls else 'mqtt'}://{self._address.host}:{self._address.port}"

    # -- the socket on the event loop ----------------------------------------------------

    def _attach(self, client: paho.Client) -> None:
        loop = asyncio.get_running_loop()
        sock = client.socket()
        loop.add_reader(sock, self._on_readable, client)
        client.on_socket_register_write = lambda c, _u, s: loop.add_writer(s, self._on_writable, c)
        client.on_socket_unregister_write = lambda _c, _u, s: loop.remove_writer(s)
        client.on_socket_close = self._on_socket_close
        if client.want_write():
            loop.add_writer(sock, self._on_writable, client)
        self._misc = loop.create_task(self._misc_loop(client))

    @staticmethod
    def _detach(client: paho.Client) -> None:
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        client.on_socket_close = None

    def _abandon(self, opening: asyncio.Future[None], client: paho.Client) -> None:
        """A connect given up on (stop() came first) has finished: close what it opened."""
        if not opening.cancelled():
            opening.exception()  # retrieved: a failure here is of no interest any more
        self._drop_socket(client)

    def _drop_socket(self, client: paho.Client) -> None:
        """Close the connection without a DISCONNECT (paho forgets the socket at its next connect)."""
        sock = client.socket()
        if sock is not None and sock.fileno() != -1:
            self._on_socket_close(client, None, sock)
            sock.close()
        self._detach(client)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _on_readable(self, client: paho.Client) -> None:
        client.loop_read()
        sock = client.socket()
        # TLS may hold decrypted bytes that the socket no longer signals as readable.
        while sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
            client.loop_read()
            sock = client.socket()

    @staticmethod
    def _on_writable(client: paho.Client) -> None:
        client.loop_write()

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # paho closing a forgotten client when it is collected: the loop is gone
            return
        if sock.fileno() != -1:
            loop.remove_reader(sock)
            loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    async def _misc_loop(self, client: paho.Client) -> None:
        """paho's timers: keepalive pings, and noticing a broker that stopped answering them."""
        period = min(_MISC_PERIOD_S, self.config.keepalive_s / 4)
        while client.loop_misc() == paho.MQTT_ERR_SUCCESS:
            await asyncio.sleep(period)

    # -- paho callbacks (on the event loop) ------------------------------------------------

    def _on_connect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(_ConnectFailed(f"connection closed before CONNACK ({reason})"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        message = Message(
            msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
            MessageProperties.from_paho(getattr(msg, "properties", None)),
        )
        for sub in list(self._subs.values()):
            if paho.topic_matches_sub(sub.match, message.topic):
                for handler in list(sub.handlers):
                    self._dispatch(handler, message)

    def _on_publish(self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        item = self._unacked.pop(mid, None)
        if item is None or item.future.done():
            return
        if reason.is_failure:
            log.warning("the broker refused a publish", extra={"topic": item.message.topic, "reason": str(reason)})
            item.future.set_exception(MqttError(f"the broker refused the publish to {item.message.topic}: {reason}"))
        else:
            item.future.set_result(None)

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any) -> None:
        topic_filter, futures = self._suback.pop(mid, ("?", ()))
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("the broker refused a subscription", extra={"filter": topic_filter, "reason": str(failed[0])})
        for future in futures:
            if future.done():
                continue
            if failed:
                future.set_exception(MqttError(f"subscription to {topic_filter} refused: {failed[0]}"))
            else:
                future.set_result(reasons[0].value)

    # -- helpers ----------------------------------------------------------------------------

    def _hand(self, client: paho.Client, item: _Pending) -> None:
        m = item.message
        props = m.properties.to_paho(PacketTypes.PUBLISH) if self._protocol == "5" and m.properties else None
        try:
            info = client.publish(m.topic, m.payload, m.qos, m.retain, properties=props)
        except ValueError as exc:  # payload over the protocol's limit, bad topic
            _fail(item, str(exc))
            return
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN) or (m.qos == 0 and info.rc != paho.MQTT_ERR_SUCCESS):
            _fail(item, paho.error_string(info.rc))
        elif m.qos == 0:
            item.future.set_result(None)
        else:  # NO_CONN too: paho keeps it and sends it at the next connect
            self._unacked[info.mid] = item

    def _send_subscribe(self, client: paho.Client, topic_filter: str, *futures: asyncio.Future[int]) -> None:
        rc, mid = client.subscribe(topic_filter, self._subs[topic_filter].qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            for future in futures:
                if not future.done():
                    future.set_exception(MqttError(f"subscribe {topic_filter}: {paho.error_string(rc)}"))
        elif futures:
            self._suback[mid] = (topic_filter, futures)

    def _dispatch(self, handler: Handler, message: Message) -> None:
        try:
            result = handler(message)
        except Exception:
            log.exception("message handler failed", extra={"topic": message.topic})
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("message handler failed", exc_info=task.exception())


def _fail(item: _Pending, why: str) -> None:
    log.warning("publish failed", extra={"topic": item.message.topic, "error": why})
    item.future.set_exception(MqttError(f"publish to {item.message.topic} failed: {why}"))


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _call(hook: Hook, what: str) -> None:
    try:
        result = hook()
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception(f"{what} failed")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")


def _ssl_context(config: MqttConfig) -> ssl.SSLContext:
    """TLS for mqtts://: the configured CA (else the system's), a client certificate if given."""
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca_file: cannot load {config.ca_file} ({exc})") from None
    if config.cert_file and config.key_file:
        try:
            context.load_cert_chain(config.cert_file, config.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cert_file: cannot load {config.cert_file} / {config.key_file} ({exc})") from None
    if config.tls_insecure:
        context.check_hostname = False
    return context
