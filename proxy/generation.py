"""Answering one completion request: from the response cache when it holds the answer, else from
the engine, as one JSON body or as a stream of SSE chunks. Errors the engine reports before the
first token become HTTP statuses; after it, an error event ends the stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from edge_runtime.client import EngineError

from . import streaming
from .cache import CachedResult, ResponseCache, cache_key
from .engine import EngineLink
from .errors import JSON_CONTENT, SERVER, ApiError, from_engine, invalid, unavailable
from .metrics import Metrics
from .openai_api import CHAT, ChunkFormat, GenRequest, response_body
from .ratelimit import RateLimiter
from .request_state import CLIENT, REQUEST_ID, SERVED_BY, START

log = logging.getLogger("proxy.generation")

TIMEOUT_MARGIN_S = 2.0  # past the engine's own deadline, the sidecar stops waiting for it
_CACHEABLE = ("stop", "length")


class Generator:
    def __init__(self, link: EngineLink, cache: ResponseCache | None, metrics: Metrics, limiter: RateLimiter,
                 aliases: tuple[str, ...], timeout_s: float) -> None:
        self.link = link
        self.cache = cache
        self.metrics = metrics
        self.limiter = limiter
        self.aliases = frozenset(aliases)
        self.timeout_s = timeout_s

    async def resolve_model(self, name: str) -> str:
        """The engine's model id for `name` (its id or an alias); 404 for any other name."""
        if self.link.model is None:
            await self.link.client()  # learns the model on connecting, or raises 503
        model_id = self.link.model["id"]
        if name != model_id and name not in self.aliases:
            raise ApiError(404, f"model {name!r} does not exist; see /v1/models", param="model", code="model_not_found")
        return model_id

    async def respond(self, request: web.Request, req: GenRequest) -> web.StreamResponse:
        model = await self.resolve_model(req.model)
        key = cache_key(model, req.kind, req.cache_fields()) if self.cache is not None and req.deterministic else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.metrics.cache_hits.inc()
                request[SERVED_BY] = "cache"
                return await self._replay(request, req, model, hit)
            self.metrics.cache_misses.inc()
        engine = await self.link.client()
        deadline = asyncio.get_running_loop().time() + self.timeout_s + TIMEOUT_MARGIN_S
        frames = engine.generate(**req.prompt, params=req.params, timeout_s=self.timeout_s)
        # Leaving this block early (an error, or the client gone) cancels the request in the engine.
        async with contextlib.aclosing(frames):
            if req.stream:
                return await self._stream(request, req, model, frames, key, deadline)
            return await self._complete(request, req, model, frames, key, deadline)

    # -- answers ----------------------------------------------------------------------

    async def _complete(self, request: web.Request, req: GenRequest, model: str, frames: AsyncIterator[dict[str, Any]],
                        key: bytes | None, deadline: float) -> web.Response:
        texts: list[str] = []
        logprobs: list[tuple[str, float]] | None = [] if req.logprobs else None
        done: dict[str, Any] = {}  # the stream always ends with a done frame, or raises
        try:
            async with asyncio.timeout_at(deadline):
                async for frame in frames:
                    if frame["type"] != "token":
                        done = frame
                        break
                    if not texts:
                        self.metrics.ttft.observe(time.perf_counter() - request[START])
                    texts.append(frame["text"])
                    if logprobs is not None:
                        logprobs.append((frame["text"], frame.get("logprob", 0.0)))
        except EngineError as exc:
            raise from_engine(exc, req.prompt_field) from None
        except TimeoutError:
            raise self._timeout() from None
        except UnicodeEncodeError:
            raise _bad_unicode() from None
        result = self._finish(request, req, done, "".join(texts), logprobs, key)
        return web.Response(body=_body(req, model, result), content_type=JSON_CONTENT)

    async def _stream(self, request: web.Request, req: GenRequest, model: str, frames: AsyncIterator[dict[str, Any]],
                      key: bytes | None, deadline: float) -> web.StreamResponse:
        # Wait for the first frame before sending headers: errors up to then get their own status.
        try:
            async with asyncio.timeout_at(deadline):
                frame = await anext(frames)
        except EngineError as exc:
            raise from_engine(exc, req.prompt_field) from None
        except TimeoutError:
            raise self._timeout() from None
        except UnicodeEncodeError:
            raise _bad_unicode() from None
        if frame["type"] == "token":
            self.metrics.ttft.observe(time.perf_counter() - request[START])
        else:
            self._check_done(frame)
        response = await streaming.open_stream(request)
        fmt = ChunkFormat(req, _response_id(req), int(time.time()), model)
        texts: list[str] = []
        logprobs: list[tuple[str, float]] | None = [] if req.logprobs else None
        try:
            async with asyncio.timeout_at(deadline):
                if req.kind == CHAT:
                    await response.write(fmt.first())
                while frame["type"] == "token":
                    text = frame["text"]
                    texts.append(text)
                    if logprobs is not None:
                        entry = (text, frame.get("logprob", 0.0))
                        logprobs.append(entry)
                        await response.write(fmt.text(text, (entry,)))
                    elif text:
                        await response.write(fmt.text(text))
                    frame = await anext(frames)
            result = self._finish(request, req, frame, "".join(texts), logprobs, key)
        except ApiError as exc:  # the engine ended the request early (deadline, shutdown)
            await streaming.fail(response, exc)
        except EngineError as exc:
            await streaming.fail(response, from_engine(exc, req.prompt_field))
        except TimeoutError:
            await streaming.fail(response, self._timeout())
        except ConnectionError:
            pass  # the client went away; leaving cancels the engine's work
        except Exception:  # a bug: the headers are gone, so the stream must still end properly
            log.exception("stream failed", extra={"request_id": request[REQUEST_ID]})
            await streaming.fail(response, ApiError(500, "internal error", type=SERVER, code="internal_error"))
        else:
            await streaming.end(response, fmt.finish(result.finish_reason, result.usage) + streaming.DONE)
        return response

    async def _replay(self, request: web.Request, req: GenRequest, model: str, hit: CachedResult) -> web.StreamResponse:
        if not req.stream:
            return web.Response(body=_body(req, model, hit), content_type=JSON_CONTENT)
        response = await streaming.open_stream(request)
        fmt = ChunkFormat(req, _response_id(req), int(time.time()), model)
        body = fmt.first() + fmt.text(hit.text, hit.logprobs) + fmt.finish(hit.finish_reason, hit.usage)
        await streaming.end(response, body + streaming.DONE)
        return response

    # -- bookkeeping --------------------------------------------------------------------

    def _finish(self, request: web.Request, req: GenRequest, done: dict[str, Any], text: str,
                logprobs: list[tuple[str, float]] | None, key: bytes | None) -> CachedResult:
        """Account for a finished request (metrics, token budget) and cache its result; raises
        the ApiError for endings that are failures."""
        usage = done.get("usage") or {}
        self.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))
        self.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.limiter.charge_tokens(request[CLIENT], usage.get("total_tokens", 0))
        self._check_done(done)
        result = CachedResult(text, done["finish_reason"], usage, tuple(logprobs) if logprobs is not None else None)
        if key is not None and result.finish_reason in _CACHEABLE:
            self.cache.put(key, result)
        return result

    def _check_done(self, done: dict[str, Any]) -> None:
        reason = done.get("finish_reason")
        if reason == "deadline":
            raise self._timeout()
        if reason not in _CACHEABLE:  # "cancelled" by the engine itself: it is shutting down
            raise unavailable("the engine stopped this request (it is shutting down)", 2.0)

    def _timeout(self) -> ApiError:
        return ApiError(504, f"the request did not finish within {self.timeout_s:g} s", type=SERVER, code="timeout")


def _body(req: GenRequest, model: str, result: CachedResult) -> bytes:
    return response_body(req, _response_id(req), int(time.time()), model, result.text, result.finish_reason,
                         result.usage, result.logprobs)


def _response_id(req: GenRequest) -> str:
    return ("chatcmpl-" if req.kind == CHAT else "cmpl-") + secrets.token_hex(12)


def _bad_unicode() -> ApiError:
    return invalid(None, "the request contains text that is not valid Unicode (a lone surrogate)")
