"""EdgeClient: the synchronous client (standard library http.client, keep-alive connections per
gateway; safe to share between threads). Retries and failover follow edge_client/retry.py."""

from __future__ import annotations

import http.client
import json
import select
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from . import http_api
from .errors import APIConnectionError, APITimeoutError, EdgeClientError
from .gateways import Gateway, GatewayPool
from .http_api import CHAT, COMPLETIONS, DONE, MODELS_PATH, Endpoint
from .retry import Attempts, RetryBudget, RetryPolicy
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, Model

T = TypeVar("T")
_IDLE_PER_GATEWAY = 16


class EdgeClient:
    """OpenAI-compatible client for one or more edge gateways.

    `gateways`: base URLs (`http://gw1:8080`, with or without `/v1`). `timeout`: seconds to wait
    for an answer (for a stream, between two events); `connect_timeout`: for the TCP connect.
    `idempotent=True` lets completions be retried even when the gateway may have started them
    (harmless for requests without side effects: a repeated completion costs tokens, nothing else).
    """

    def __init__(self, gateways: str | Sequence[str], *, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, retry: RetryPolicy | None = None, idempotent: bool = False,
                 health_path: str = "/healthz", cooldown_s: float = 2.0, max_cooldown_s: float = 30.0,
                 headers: Mapping[str, str] | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        urls = [gateways] if isinstance(gateways, str) else list(gateways)
        self.pool = GatewayPool(urls, cooldown_s, max_cooldown_s)
        self.retry = retry or RetryPolicy()
        self.budget = RetryBudget(self.retry.budget_ratio, self.retry.budget_reserve)
        self.api_key = api_key
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.idempotent = idempotent
        self.health_path = health_path
        self.headers = dict(headers or {})
        self._ssl = ssl_context
        self._connections = {g.url: _Connections(g.url, ssl_context) for g in self.pool.gateways}

    # -- the API ------------------------------------------------------------------------

    def chat(self, messages: list[Mapping[str, Any]], *, model: str, idempotent: bool | None = None,
             headers: Mapping[str, str] | None = None, **params: Any) -> ChatCompletion:
        """POST /v1/chat/completions; `params` are the API's (max_tokens, temperature, seed, stop, ...)."""
        return self._complete(CHAT, http_api.chat_body(messages, model, params, False), idempotent, headers)

    def chat_stream(self, messages: list[Mapping[str, Any]], *, model: str, idempotent: bool | None = None,
                    headers: Mapping[str, str] | None = None, **params: Any) -> Stream[ChatCompletionChunk]:
        """The same, streamed: iterate over the returned Stream for ChatCompletionChunk objects."""
        return self._stream(CHAT, http_api.chat_body(messages, model, params, True), idempotent, headers)

    def complete(self, prompt: str | list[int], *, model: str, idempotent: bool | None = None,
                 headers: Mapping[str, str] | None = None, **params: Any) -> Completion:
        """POST /v1/completions."""
        return self._complete(COMPLETIONS, http_api.completion_body(prompt, model, params, False), idempotent, headers)

    def complete_stream(self, prompt: str | list[int], *, model: str, idempotent: bool | None = None,
                        headers: Mapping[str, str] | None = None, **params: Any) -> Stream[CompletionChunk]:
        return self._stream(COMPLETIONS, http_api.completion_body(prompt, model, params, True), idempotent, headers)

    def models(self) -> list[Model]:
        """GET /v1/models (retried like any GET)."""
        gateway, conn, response = self._send("GET", MODELS_PATH, None, True, None)
        body = self._read(gateway, conn, response)
        return [Model.parse(m) for m in json.loads(body).get("data", [])]

    def close(self) -> None:
        for connections in self._connections.values():
            connections.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------

    def _complete(self, endpoint: Endpoint, body: dict[str, Any], idempotent: bool | None,
                  headers: Mapping[str, str] | None) -> Any:
        gateway, conn, response = self._send("POST", endpoint.path, body, self._idempotent(idempotent), headers)
        raw = self._read(gateway, conn, response)
        return endpoint.parse(json.loads(raw), http_api.meta(gateway.url, response.getheader))

    def _stream(self, endpoint: Endpoint, body: dict[str, Any], idempotent: bool | None,
                headers: Mapping[str, str] | None) -> Stream[Any]:
        gateway, conn, response = self._send("POST", endpoint.path, body, self._idempotent(idempotent), headers)
        return Stream(self, endpoint, gateway, conn, response)

    def _idempotent(self, idempotent: bool | None) -> bool:
        return self.idempotent if idempotent is None else idempotent

    def _send(self, method: str, path: str, body: dict[str, Any] | None, idempotent: bool,
              extra: Mapping[str, str] | None) -> tuple[Gateway, http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send until an answer below 400 comes (returned with its connection), or raise."""
        payload = None if body is None else json.dumps(body).encode()
        request_headers = http_api.headers(self.api_key, {**self.headers, **(extra or {})}, http_api.new_request_id(),
                                           payload is not None)
        attempts = Attempts(self.pool, self.retry, self.budget, idempotent)
        while True:
            self._start_probes()
            gateway = attempts.gateway()
            try:
                conn, response = self._attempt(gateway, method, path, payload, request_headers)
                if response.status < 400:
                    attempts.succeeded(gateway)
                    return gateway, conn, response
                raw = self._read(gateway, conn, response)
                error: EdgeClientError = http_api.error_of(response.status, raw, gateway.url, response.getheader)
            except EdgeClientError as exc:
                error = exc
            delay = attempts.retry_delay(gateway, error)
            if delay is None:
                raise error
            time.sleep(delay)

    def _attempt(self, gateway: Gateway, method: str, path: str, payload: bytes | None,
                 request_headers: dict[str, str]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn, reused = self._connections[gateway.url].take(self.connect_timeout)
        if not reused:
            try:
                conn.connect()
            except TimeoutError:
                conn.close()
                raise APITimeoutError(f"{gateway.url}: connect timed out", gateway=gateway.url) from None
            except OSError as exc:  # refused, unreachable, DNS, TLS handshake
                conn.close()
                raise APIConnectionError(f"{gateway.url}: cannot connect ({exc})", gateway=gateway.url) from None
        conn.sock.settimeout(self.timeout)
        try:
            conn.request(method, path, body=payload, headers=request_headers)
        except (OSError, http.client.HTTPException) as exc:  # the gateway never read the whole request
            conn.close()
            raise APIConnectionError(f"{gateway.url}: connection lost while sending ({exc})", gateway=gateway.url) from None
        try:
            return conn, conn.getresponse()
        except TimeoutError:
            conn.close()
            raise APITimeoutError(f"{gateway.url}: no answer within {self.timeout:g} s", gateway=gateway.url,
                                  may_have_started=True) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise APIConnectionError(f"{gateway.url}: connection lost before the answer ({exc})", gateway=gateway.url,
                                     may_have_started=True) from None

    def _read(self, gateway: Gateway, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> bytes:
        try:
            raw = response.read()
        except TimeoutError:
            conn.close()
            raise APITimeoutError(f"{gateway.url}: answer stalled", gateway=gateway.url, may_have_started=True) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise APIConnectionError(f"{gateway.url}: connection lost during the answer ({exc})", gateway=gateway.url,
                                     may_have_started=True) from None
        self._release(gateway.url, conn, response)
        return raw

    def _release(self, url: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        if response.will_close:
            conn.close()
        else:
            self._connections[url].give(conn)

    # -- health probes -------------------------------------------------------------------

    def _start_probes(self) -> None:
        for gateway in self.pool.due_probes():
            threading.Thread(target=self._probe, args=(gateway,), name="edge-client-probe", daemon=True).start()

    def _probe(self, gateway: Gateway) -> None:
        ok = False
        conn = _Connections(gateway.url, self._ssl).new(http_api.HEALTH_TIMEOUT_S)
        try:
            conn.request("GET", self.health_path, headers={"User-Agent": http_api.USER_AGENT})
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
            self.pool.probed(gateway, ok)


class Stream(Generic[T]):
    """A streamed answer: iterate for chunks (typed); `close()` (or leaving a `with` block)
    stops it early, which cancels the generation on the gateway. An error event mid-stream
    raises the typed error; a broken connection raises APIConnectionError."""

    def __init__(self, client: EdgeClient, endpoint: Endpoint, gateway: Gateway, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self.meta = http_api.meta(gateway.url, response.getheader)
        self._client = client
        self._endpoint = endpoint
        self._gateway = gateway
        self._conn = conn
        self._response = response
        self._done = False

    def __iter__(self) -> Iterator[T]:
        decoder = http_api.SSEDecoder()
        try:
            while not self._done:
                try:
                    line = self._response.readline()
                except TimeoutError:
                    raise APITimeoutError(f"{self._gateway.url}: stream stalled", gateway=self._gateway.url,
                                          may_have_started=True) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise APIConnectionError(f"{self._gateway.url}: stream broken ({exc})", gateway=self._gateway.url,
                                             may_have_started=True) from None
                if not line:
                    raise APIConnectionError(f"{self._gateway.url}: stream ended without [DONE]", gateway=self._gateway.url,
                                             may_have_started=True)
                data = decoder.feed(line.decode("utf-8"))
                if data is None:
                    continue
                event = http_api.stream_event(data, self._endpoint, self._gateway.url, self.meta.request_id)
                if event is DONE:
                    self._finish()
                    return
                yield event
        finally:
            self.close()

    def _finish(self) -> None:
        """Read the rest of the body so the connection can carry the next request."""
        self._done = True
        try:
            self._response.read()
            self._client._release(self._gateway.url, self._conn, self._response)
        except (OSError, http.client.HTTPException):
            self._conn.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()  # the gateway sees the client gone and cancels the generation

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Connections:
    """Idle keep-alive connections to one gateway. One that the gateway closed while idle (or
    that holds unexpected bytes) is noticed before reuse and dropped, so a request is not sent
    into a connection that is already gone."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gateway URL must be http:// or https://host[:port], got {url!r}")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.ssl_context = ssl_context
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def new(self, connect_timeout: float) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=connect_timeout, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=connect_timeout)

    def take(self, connect_timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """An idle live connection (True), or a new unconnected one (False)."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _alive(conn):
                    return conn, True
                conn.close()
        return self.new(connect_timeout), False

    def give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < _IDLE_PER_GATEWAY:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _alive(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is readable only when the peer closed it (or broke protocol)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
