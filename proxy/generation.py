"""Answering one completion request: from the response cache when it holds the answer, else from
the engine, as one JSON body or as a stream of SSE chunks. Errors the engine reports before the
first token become HTTP statuses; after it, an error event ends the stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from edge_runtime.client import EngineError

from . import spans, streaming
from .answer import CONTENT_FILTER, Answer, Released
from .cache import CachedResult, ResponseCache, cache_key
from .engine import EngineLink
from .errors import JSON_CONTENT, SERVER, ApiError, from_engine, invalid, unavailable, unsupported
from .metrics import Metrics
from .openai_api import CHAT, ChunkFormat, GenRequest, response_body
from .ratelimit import RateLimiter
from .router import Router
from .safety import PolicySource, PolicyViolation, SafetyFilter, screen_prompt
from .request_state import CLIENT, REQUEST_ID, SERVED_BY, START

log = logging.getLogger("proxy.generation")

TIMEOUT_MARGIN_S = 2.0  # past the engine's own deadline, the sidecar stops waiting for it
_CACHEABLE = ("stop", "length")
_ENDINGS = (*_CACHEABLE, "tool_calls")  # the engine's finish reasons that are answers
Cancel = Callable[[], Awaitable[None]]


class Generator:
    def __init__(self, link: EngineLink, cache: ResponseCache | None, metrics: Metrics, limiter: RateLimiter,
                 aliases: tuple[str, ...], timeout_s: float, safety: PolicySource) -> None:
        self.link = link
        self.cache = cache
        self.metrics = metrics
        self.limiter = limiter
        self.aliases = frozenset(aliases)
        self.timeout_s = timeout_s
        self.safety = safety
        self._ids = itertools.count(1)  # engine request ids, so that a blocked answer can be cancelled by id
        self.router = Router(link)  # local engine first; the cloud too once offload is enabled (proxy/services.py)

    async def resolve_model(self, name: str) -> str:
        """The engine's model id for `name` (its id or an alias); 404 for any other name."""
        if self.link.model is None:
            try:
                await self.link.client()  # learns the model on connecting, or raises 503
            except ApiError:
                if not self.router.cloud_ready:
                    raise
                return name  # never met the engine: the cloud decides what the name means
        model_id = self.link.model["id"]
        if name != model_id and name not in self.aliases:
            raise ApiError(404, f"model {name!r} does not exist; see /v1/models", param="model", code="model_not_found")
        return model_id

    async def respond(self, request: web.Request, req: GenRequest) -> web.StreamResponse:
        model = await self.resolve_model(req.model)
        safety = self.safety.current()
        req = _screen(req, safety)  # before the cache and the engine: a blocked prompt goes nowhere
        key = cache_key(model, req.kind, req.cache_fields()) if self.cache is not None and req.deterministic else None
        if key is not None:
            with spans.span("cache.lookup") as span:
                hit = self.cache.get(key)
                if span is not None:
                    span.set_attribute("edge.cache.hit", hit is not None)
            if hit is not None:
                self.metrics.cache_hits.inc()
                request[SERVED_BY] = "cache"
                return await self._replay(request, req, model, hit, safety)
            self.metrics.cache_misses.inc()
        with spans.span("route") as span:  # local engine, or the cloud (proxy/router.py)
            plan = await self.router.plan()
            if span is not None:
                span.set_attribute("edge.route", plan.route)
        deadline = asyncio.get_running_loop().time() + self.timeout_s + TIMEOUT_MARGIN_S
        with spans.client_span("engine.generate"):
            engine_id = f"sc{next(self._ids)}"
            route = await self.router.open(plan, req, engine_id, self.timeout_s, spans.outgoing(request.headers),
                                           functools.partial(request.__setitem__, SERVED_BY))
            frames, cancel = route.frames, route.cancel
            answer = Answer(safety, req.logprobs)
            # Leaving this block early (an error, or the client gone) cancels the request in the engine.
            async with contextlib.aclosing(frames):
                if req.stream:
                    return await self._stream(request, req, model, frames, key, deadline, answer, cancel)
                return await self._complete(request, req, model, frames, key, deadline, answer, cancel)

    # -- answers ----------------------------------------------------------------------

    async def _complete(self, request: web.Request, req: GenRequest, model: str, frames: AsyncIterator[dict[str, Any]],
                        key: bytes | None, deadline: float, answer: Answer, cancel: Cancel) -> web.Response:
        done: dict[str, Any] = {}  # the stream always ends with a done frame, or raises
        try:
            async with asyncio.timeout_at(deadline):
                async for frame in frames:
                    if frame["type"] != "token":
                        done = frame
                        break
                    if not answer.raw:
                        self.metrics.ttft.observe(time.perf_counter() - request[START])
                    answer.token(frame)
                    if answer.blocked is not None:
                        done = await _drain(frames, cancel)
                        break
                answer.end()
        except EngineError as exc:
            raise from_engine(exc, req.prompt_field) from None
        except TimeoutError:
            raise self._timeout() from None
        except UnicodeEncodeError:
            raise _bad_unicode() from None
        result = self._finish(request, req, done, answer, key)
        return web.Response(body=_body(req, model, result, answer.tools.calls), content_type=JSON_CONTENT)

    async def _stream(self, request: web.Request, req: GenRequest, model: str, frames: AsyncIterator[dict[str, Any]],
                      key: bytes | None, deadline: float, answer: Answer, cancel: Cancel) -> web.StreamResponse:
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
        try:
            async with asyncio.timeout_at(deadline):
                if req.kind == CHAT:
                    await response.write(fmt.first())
                while frame["type"] == "token":
                    await _write(response, fmt, answer.token(frame), answer)
                    if answer.blocked is not None:
                        frame = await _drain(frames, cancel)
                        break
                    frame = await anext(frames)
                await _write(response, fmt, answer.end(), None)
            result = self._finish(request, req, frame, answer, key)
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

    async def _replay(self, request: web.Request, req: GenRequest, model: str, hit: CachedResult,
                      safety: SafetyFilter) -> web.StreamResponse:
        if safety.checks_output:  # the policy in force now decides what a cached answer may show
            screened = safety.screen(hit.text, "output")
            reason = hit.finish_reason if screened.blocked is None else CONTENT_FILTER
            hit = CachedResult(screened.text, reason, hit.usage, hit.logprobs)
        if not req.stream:
            return web.Response(body=_body(req, model, hit), content_type=JSON_CONTENT)
        response = await streaming.open_stream(request)
        fmt = ChunkFormat(req, _response_id(req), int(time.time()), model)
        body = fmt.first() + fmt.text(hit.text, hit.logprobs) + fmt.finish(hit.finish_reason, hit.usage)
        await streaming.end(response, body + streaming.DONE)
        return response

    # -- bookkeeping --------------------------------------------------------------------

    def _finish(self, request: web.Request, req: GenRequest, done: dict[str, Any], answer: Answer,
                key: bytes | None) -> CachedResult:
        """Account for a finished request (metrics, token budget) and cache its result; return
        what the client sees (content_filter when the safety filter ended it); raises the
        ApiError for endings that are failures."""
        usage = done.get("usage") or {}
        self.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))
        self.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.limiter.charge_tokens(request[CLIENT], usage.get("total_tokens", 0))
        spans.note_usage(usage)
        logprobs = tuple(answer.logprobs) if answer.logprobs is not None else None
        if answer.blocked is not None:
            return CachedResult(answer.text, CONTENT_FILTER, usage, logprobs)
        self._check_done(done)
        if key is not None and done["finish_reason"] in _CACHEABLE:  # as generated: replays are screened anew
            self.cache.put(key, CachedResult("".join(answer.raw), done["finish_reason"], usage, logprobs))
        return CachedResult(answer.text, done["finish_reason"], usage, logprobs)

    def _check_done(self, done: dict[str, Any]) -> None:
        reason = done.get("finish_reason")
        if reason == "deadline":
            raise self._timeout()
        if reason not in _ENDINGS:  # "cancelled" by the engine itself: it is shutting down
            raise unavailable("the engine stopped this request (it is shutting down)", 2.0)

    def _timeout(self) -> ApiError:
        return ApiError(504, f"the request did not finish within {self.timeout_s:g} s", type=SERVER, code="timeout")


def _body(req: GenRequest, model: str, result: CachedResult, tool_calls: list[dict[str, Any]] | None = None) -> bytes:
    return response_body(req, _response_id(req), int(time.time()), model, result.text, result.finish_reason,
                         result.usage, result.logprobs, tool_calls)


def _screen(req: GenRequest, safety: SafetyFilter) -> GenRequest:
    """The request with the input policy applied (redactions), or the 400 of a blocked prompt."""
    if not safety.active:
        return req
    if req.logprobs and safety.checks_output:
        # Token logprobs would show the text the output filter holds back or redacts.
        raise unsupported("logprobs", "logprobs cannot be combined with the output safety filter")
    try:
        prompt = screen_prompt(safety, req.prompt)
    except PolicyViolation as exc:
        param = req.prompt_field if exc.param == "prompt" else exc.param
        raise ApiError(400, str(exc), param=param, code="content_policy_violation") from None
    return req if prompt is req.prompt else dataclasses.replace(req, prompt=prompt)


async def _drain(frames: AsyncIterator[dict[str, Any]], cancel: Cancel) -> dict[str, Any]:
    """Stop the engine (the answer was blocked) and return its last frame, for the usage."""
    await cancel()
    async for frame in frames:
        if frame["type"] != "token":
            return frame
    return {}


async def _write(response: web.StreamResponse, fmt: ChunkFormat, out: Released, answer: Answer | None) -> None:
    """The chunks of what one frame released: text (with its token's logprob when asked), then
    tool-call deltas."""
    if answer is not None and answer.logprobs is not None:  # one chunk per token, even an empty one
        await response.write(fmt.text(out.text, answer.logprobs[-1:]))
    elif out.text:
        await response.write(fmt.text(out.text))
    if out.tool_calls:
        await response.write(fmt.tool_calls(out.tool_calls))


def _response_id(req: GenRequest) -> str:
    return ("chatcmpl-" if req.kind == CHAT else "cmpl-") + secrets.token_hex(12)


def _bad_unicode() -> ApiError:
    return invalid(None, "the request contains text that is not valid Unicode (a lone surrogate)")
