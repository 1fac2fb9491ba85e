"""AsyncEdgeClient: the asyncio client (aiohttp), with the sync client's API as coroutines and
the same retry and failover rules (edge_client/retry.py). aiohttp cannot tell a connection that
failed while the request was being written from one that failed after, so here every failure
after the connection was made counts as "may have started"."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import aiohttp

from . import http_api
from .errors import APIConnectionError, APITimeoutError, EdgeClientError
from .gateways import Gateway, GatewayPool
from .http_api import CHAT, COMPLETIONS, DONE, MODELS_PATH, Endpoint
from .retry import Attempts, RetryBudget, RetryPolicy
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, Model

T = TypeVar("T")


class AsyncEdgeClient:
    """See EdgeClient; use it in one event loop (`async with AsyncEdgeClient(...) as client`)."""

    def __init__(self, gateways: str | Sequence[str], *, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, retry: RetryPolicy | None = None, idempotent: bool = False,
                 health_path: str = "/healthz", cooldown_s: float = 2.0, max_cooldown_s: float = 30.0,
                 headers: Mapping[str, str] | None = None, ssl: Any = None) -> None:
        urls = [gateways] if isinstance(gateways, str) else list(gateways)
        self.pool = GatewayPool(urls, cooldown_s, max_cooldown_s)
        self.retry = retry or RetryPolicy()
        self.budget = RetryBudget(self.retry.budget_ratio, self.retry.budget_reserve)
        self.api_key = api_key
        self.idempotent = idempotent
        self.health_path = health_path
        self.headers = dict(headers or {})
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=timeout)
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None
        self._probes: set[asyncio.Task[None]] = set()

    # -- the API ------------------------------------------------------------------------

    async def chat(self, messages: list[Mapping[str, Any]], *, model: str, idempotent: bool | None = None,
                   headers: Mapping[str, str] | None = None, **params: Any) -> ChatCompletion:
        return await self._complete(CHAT, http_api.chat_body(messages, model, params, False), idempotent, headers)

    async def chat_stream(self, messages: list[Mapping[str, Any]], *, model: str, idempotent: bool | None = None,
                          headers: Mapping[str, str] | None = None, **params: Any) -> AsyncStream[ChatCompletionChunk]:
        """`async for chunk in await client.chat_stream(...)`: ChatCompletionChunk objects."""
        return await self._stream(CHAT, http_api.chat_body(messages, model, params, True), idempotent, headers)

    async def complete(self, prompt: str | list[int], *, model: str, idempotent: bool | None = None,
                       headers: Mapping[str, str] | None = None, **params: Any) -> Completion:
        return await self._complete(COMPLETIONS, http_api.completion_body(prompt, model, params, False), idempotent, headers)

    async def complete_stream(self, prompt: str | list[int], *, model: str, idempotent: bool | None = None,
                              headers: Mapping[str, str] | None = None, **params: Any) -> AsyncStream[CompletionChunk]:
        return await self._stream(COMPLETIONS, http_api.completion_body(prompt, model, params, True), idempotent, headers)

    async def models(self) -> list[Model]:
        gateway, response = await self._send("GET", MODELS_PATH, None, True, None)
        body = await _read(gateway, response)
        return [Model.parse(m) for m in json.loads(body).get("data", [])]

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncEdgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests -----------------------------------------------------------------------

    async def _complete(self, endpoint: Endpoint, body: dict[str, Any], idempotent: bool | None,
                        headers: Mapping[str, str] | None) -> Any:
        gateway, response = await self._send("POST", endpoint.path, body, self._idempotent(idempotent), headers)
        raw = await _read(gateway, response)
        return endpoint.parse(json.loads(raw), http_api.meta(gateway.url, response.headers.get))

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any], idempotent: bool | None,
                      headers: Mapping[str, str] | None) -> AsyncStream[Any]:
        gateway, response = await self._send("POST", endpoint.path, body, self._idempotent(idempotent), headers)
        return AsyncStream(endpoint, gateway, response)

    def _idempotent(self, idempotent: bool | None) -> bool:
        return self.idempotent if idempotent is None else idempotent

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:  # made inside the running loop, as aiohttp wants
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self._session

    async def _send(self, method: str, path: str, body: dict[str, Any] | None, idempotent: bool,
                    extra: Mapping[str, str] | None) -> tuple[Gateway, aiohttp.ClientResponse]:
        payload = None if body is None else json.dumps(body).encode()
        request_headers = http_api.headers(self.api_key, {**self.headers, **(extra or {})}, http_api.new_request_id(),
                                           payload is not None)
        attempts = Attempts(self.pool, self.retry, self.budget, idempotent)
        session = self._session_now()
        while True:
            self._start_probes()
            gateway = attempts.gateway()
            try:
                response = await _attempt(session, gateway, method, path, payload, request_headers)
                if response.status < 400:
                    attempts.succeeded(gateway)
                    return gateway, response
                raw = await _read(gateway, response)
                error: EdgeClientError = http_api.error_of(response.status, raw, gateway.url, response.headers.get)
            except EdgeClientError as exc:
                error = exc
            except BaseException:
                self.pool.release(gateway)  # cancelled: the gateway did nothing wrong
                raise
            delay = attempts.retry_delay(gateway, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    # -- health probes -------------------------------------------------------------------

    def _start_probes(self) -> None:
        for gateway in self.pool.due_probes():
            task = asyncio.get_running_loop().create_task(self._probe(gateway))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, gateway: Gateway) -> None:
        ok = False
        try:
            timeout = aiohttp.ClientTimeout(total=http_api.HEALTH_TIMEOUT_S)
            async with self._session_now().get(gateway.url + self.health_path, timeout=timeout) as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            pass
        finally:
            self.pool.probed(gateway, ok)


async def _attempt(session: aiohttp.ClientSession, gateway: Gateway, method: str, path: str, payload: bytes | None,
                   request_headers: dict[str, str]) -> aiohttp.ClientResponse:
    try:
        return await session.request(method, gateway.url + path, data=payload, headers=request_headers)
    except aiohttp.ConnectionTimeoutError:
        raise APITimeoutError(f"{gateway.url}: connect timed out", gateway=gateway.url) from None
    except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS: never reached the gateway
        raise APIConnectionError(f"{gateway.url}: cannot connect ({exc})", gateway=gateway.url) from None
    except TimeoutError:
        raise APITimeoutError(f"{gateway.url}: no answer in time", gateway=gateway.url, may_have_started=True) from None
    except aiohttp.ClientError as exc:
        raise APIConnectionError(f"{gateway.url}: connection lost ({exc})", gateway=gateway.url, may_have_started=True) from None


async def _read(gateway: Gateway, response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.read()
    except TimeoutError:
        raise APITimeoutError(f"{gateway.url}: answer stalled", gateway=gateway.url, may_have_started=True) from None
    except aiohttp.ClientError as exc:
        raise APIConnectionError(f"{gateway.url}: connection lost during the answer ({exc})", gateway=gateway.url,
                                 may_have_started=True) from None
    finally:
        response.release()


class AsyncStream(Generic[T]):
    """A streamed answer: `async for chunk in stream`; `await stream.close()` (or `async with`)
    stops it early, which cancels the generation on the gateway."""

    def __init__(self, endpoint: Endpoint, gateway: Gateway, response: aiohttp.ClientResponse) -> None:
        self.meta = http_api.meta(gateway.url, response.headers.get)
        self._endpoint = endpoint
        self._gateway = gateway
        self._response = response
        self._done = False

    async def __aiter__(self) -> AsyncIterator[T]:
        decoder = http_api.SSEDecoder()
        url = self._gateway.url
        try:
            while not self._done:
                try:
                    line = await self._response.content.readline()
                except TimeoutError:
                    raise APITimeoutError(f"{url}: stream stalled", gateway=url, may_have_started=True) from None
                except aiohttp.ClientError as exc:
                    raise APIConnectionError(f"{url}: stream broken ({exc})", gateway=url, may_have_started=True) from None
                if not line:
                    raise APIConnectionError(f"{url}: stream ended without [DONE]", gateway=url, may_have_started=True)
                data = decoder.feed(line.decode("utf-8"))
                if data is None:
                    continue
                event = http_api.stream_event(data, self._endpoint, url, self.meta.request_id)
                if event is DONE:
                    self._done = True
                    await self._response.read()  # to the end: the connection goes back to the pool
                    self._response.release()
                    return
                yield event
        finally:
            await self.close()

    async def close(self) -> None:
        if not self._done:
            self._done = True
            self._response.close()  # the gateway sees the client gone and cancels the generation

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
