"""The completion service: a typed request and its caller in, a stream of events out, the same
for every front. It resolves the model, screens the prompt, answers from the response cache
when it can, routes the rest (local engine or cloud), assembles the answer through the output
filter and the tool-call parser, accounts for tokens, and maps every failure to an ApiError.

Everything up to the first answer frame happens in `open` (so a front can still answer a
failure with its own status); after that, `Completion.events()` yields text and tool-call
deltas and one final Done, or raises the ApiError that ended the answer.

A request whose path is lost (the router's PathLost: the engine died, a cloud worker died) while
nothing of its answer has reached the client is moved to another path once (docs/reliability.md):
a stream until its first frame (the HTTP headers go out with it), a plain answer until its end
(it is released whole). A stream already started ends with the path's error."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Union

from edge_runtime.client import EngineError

from .. import spans
from ..metrics import Metrics
from ..safety import PolicySource, PolicyViolation, SafetyFilter, screen_prompt
from .answer import CONTENT_FILTER, Answer, Released
from .cache import CachedResult, ResponseCache, cache_key
from .engine_link import EngineLink
from .errors import SERVER, ApiError, from_engine, invalid, unavailable, unsupported
from .request import Caller, CompletionRequest
from .router import CACHE, LOCAL, PathLost, Route, Router

log = logging.getLogger("proxy.service")

TIMEOUT_MARGIN_S = 2.0  # past the engine's own deadline, the sidecar stops waiting for it
CACHEABLE = frozenset({"stop", "length"})
_ENDINGS = CACHEABLE | {"tool_calls"}  # the engine's finish reasons that are answers
_NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
Cancel = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    logprobs: tuple[tuple[str, float], ...] | None = None  # the (token, logprob) entries this text came from


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    entries: list[dict[str, Any]]  # OpenAI stream entries: index, id/type/name first, then argument fragments


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str  # stop, length, tool_calls or content_filter
    usage: dict[str, int]
    text: str  # the whole answer as the client sees it
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: tuple[tuple[str, float], ...] | None = None


Event = Union[TextDelta, ToolCallDelta, Done]


class CompletionService:
    def __init__(self, link: EngineLink, router: Router, metrics: Metrics, safety: PolicySource, aliases: tuple[str, ...],
                 timeout_s: float, cache: ResponseCache | None) -> None:
        self.link = link
        self.router = router
        self.metrics = metrics
        self.safety = safety
        self.aliases = frozenset(aliases)
        self.timeout_s = timeout_s
        self.cache = cache
        self._ids = itertools.count(1)  # engine request ids, so that a blocked answer can be cancelled by id

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

    @contextlib.asynccontextmanager
    async def open(self, req: CompletionRequest, caller: Caller) -> AsyncIterator[Completion]:
        """The request started: answered from the cache, or its route open and its first frame in.
        Leaving the block early (an error, the client gone) cancels the work in the engine."""
        model = await self.resolve_model(req.model)
        safety = self.safety.current()
        req = _screen(req, safety)  # before the cache and the engine: a blocked prompt goes nowhere
        key = (cache_key(model, req.kind, req.cache_fields(), None if self.cache.shared else caller.client)
               if self.cache is not None and req.deterministic else None)
        if key is not None:
            with spans.span("cache.lookup") as span:
                hit = self.cache.get(key)
                if span is not None:
                    span.set_attribute("edge.cache.hit", hit is not None)
            if hit is not None:
                self.metrics.cache_hits.inc()
                _route(caller, CACHE)
                yield Completion(self, req, caller, model, _replayed(hit, safety))
                return
            self.metrics.cache_misses.inc()
        with spans.span("route") as span:  # local engine, or the cloud (proxy/core/router.py)
            plan = await self.router.plan()
            if span is not None:
                span.set_attribute("edge.route", plan.route)
        deadline = asyncio.get_running_loop().time() + self.timeout_s + TIMEOUT_MARGIN_S
        with spans.client_span("engine.generate"):
            request_id, trace = f"sc{next(self._ids)}", spans.outgoing(caller.trace)
            try:
                route = await self.router.open(plan, req, request_id, self.timeout_s, trace, caller.on_route)
            except UnicodeEncodeError:
                raise _bad_unicode() from None
            attempt = _Attempt(route, request_id, trace, deadline)
            try:
                first = await self._first_moving(attempt, req, caller)
                first_at = time.perf_counter()
                yield Completion(self, req, caller, model, self._answer(attempt, first, safety, req, key, caller, first_at))
            finally:
                await attempt.close()

    # -- the engine's answer ----------------------------------------------------------------

    async def _first_moving(self, attempt: _Attempt, req: CompletionRequest, caller: Caller) -> dict[str, Any]:
        """The first frame; when the path is lost before it, the first frame of another path."""
        try:
            return await self._first(attempt.route.frames, req, attempt.deadline, caller)
        except PathLost as lost:
            return await self._first_elsewhere(attempt, lost, req, caller)

    async def _first_elsewhere(self, attempt: _Attempt, lost: PathLost, req: CompletionRequest,
                               caller: Caller) -> dict[str, Any]:
        """Move the request (once) and return the new path's first frame; a second loss ends it."""
        await self._move(attempt, lost, req, caller)
        try:
            return await self._first(attempt.route.frames, req, attempt.deadline, caller)
        except PathLost as again:
            raise again.error from None

    async def _move(self, attempt: _Attempt, lost: PathLost, req: CompletionRequest, caller: Caller) -> None:
        """Put the request on another path (once), or raise the lost path's error."""
        left = attempt.deadline - asyncio.get_running_loop().time() - TIMEOUT_MARGIN_S
        if attempt.moved or left < 0.5:
            raise lost.error from None
        attempt.moved = True
        try:
            route = await self.router.redispatch(attempt.route, lost, req, f"{attempt.request_id}-r", left, attempt.trace,
                                                 caller.on_route)
        except UnicodeEncodeError:
            raise _bad_unicode() from None
        if route is None:
            raise lost.error from None
        log.info("request moved", extra={"request_id": attempt.request_id, "from": attempt.route.served_by,
                                         "to": route.served_by, "why": lost.reason})
        self.metrics.redispatched.labels(attempt.route.served_by, route.served_by).inc()
        await attempt.replace(route)

    async def _first(self, frames: AsyncIterator[dict[str, Any]], req: CompletionRequest, deadline: float,
                     caller: Caller) -> dict[str, Any]:
        try:
            async with asyncio.timeout_at(deadline):
                frame = await anext(frames)
        except EngineError as exc:
            raise from_engine(exc, req.prompt_field) from None
        except TimeoutError:
            raise self.timeout() from None
        except UnicodeEncodeError:
            raise _bad_unicode() from None
        if frame["type"] == "token":
            self.metrics.first_token(time.perf_counter() - caller.start)
        else:
            self._check_done(frame)
        return frame

    async def _answer(self, attempt: _Attempt, frame: dict[str, Any], safety: SafetyFilter, req: CompletionRequest,
                      key: bytes | None, caller: Caller, last: float) -> AsyncIterator[Event]:
        """`last`: when `frame` arrived (the start of the first interval between tokens)."""
        answer = Answer(safety, req.logprobs)
        while True:
            try:
                # Token intervals are the engine's only on the local route (the cloud's arrive in batches).
                tpot = self.metrics.tpot if attempt.route.served_by == LOCAL else None
                async with asyncio.timeout_at(attempt.deadline):
                    while frame["type"] == "token":
                        for event in _released(answer.token(frame), answer):
                            yield event
                        if answer.blocked is not None:
                            frame = await _drain(attempt.route.frames, attempt.route.cancel)
                            break
                        frame = await anext(attempt.route.frames)
                        if tpot is not None and frame["type"] == "token":
                            now = time.perf_counter()
                            tpot.observe(now - last)
                            last = now
                    for event in _released(answer.end(frame.get("finish_reason")), None):
                        yield event
                break
            except PathLost as lost:
                if req.stream or answer.blocked is not None:  # its start reached the client
                    raise lost.error from None
                # A plain answer: nothing was released yet.
                frame = await self._first_elsewhere(attempt, lost, req, caller)
                answer, last = Answer(safety, req.logprobs), time.perf_counter()
            except EngineError as exc:
                raise from_engine(exc, req.prompt_field) from None
            except TimeoutError:
                raise self.timeout() from None
        yield self._finish(req, frame, answer, key, caller)

    def _finish(self, req: CompletionRequest, done: dict[str, Any], answer: Answer, key: bytes | None,
                caller: Caller) -> Done:
        """Account for a finished request (metrics, token budget) and cache its result; return what
        the client sees (content_filter when the safety filter ended it); raises the ApiError of
        endings that are failures."""
        usage = done.get("usage") or _NO_USAGE
        self.metrics.count_tokens(usage)
        caller.limiter.charge_tokens(caller.client, usage.get("total_tokens", 0))
        spans.note_usage(usage)
        for why, n in answer.tools.dropped.items():
            self.metrics.tool_calls_dropped.labels(why).inc(n)
        logprobs = tuple(answer.logprobs) if answer.logprobs is not None else None
        seconds = time.perf_counter() - caller.start
        if answer.blocked is not None:
            self.metrics.finished(CONTENT_FILTER, usage, done.get("timings"), seconds)
            return Done(CONTENT_FILTER, usage, answer.text, answer.tools.calls, logprobs)
        self._check_done(done)
        reason = done["finish_reason"]
        self.metrics.finished(reason, usage, done.get("timings"), seconds)
        # As generated: replays are screened anew. A cut answer that holds complete tool calls is not
        # cached: the cache keeps text, and a replay would drop the calls.
        if key is not None and self.cache is not None and reason in CACHEABLE and not answer.tools.calls:
            self.cache.put(key, CachedResult("".join(answer.raw), reason, usage, logprobs))
        return Done(reason, usage, answer.text, answer.tools.calls, logprobs)

    def _check_done(self, done: dict[str, Any]) -> None:
        reason = done.get("finish_reason")
        if reason == "deadline":
            raise self.timeout()
        if reason not in _ENDINGS:  # "cancelled" by the engine itself: it is shutting down
            raise unavailable("the engine stopped this request (it is shutting down)", 2.0)

    def timeout(self) -> ApiError:
        return ApiError(504, f"the request did not finish within {self.timeout_s:g} s", type=SERVER, code="timeout")


class _Attempt:
    """The path a request is on now (it may move once), and what stays with the request."""

    def __init__(self, route: Route, request_id: str, trace: dict[str, str] | None, deadline: float) -> None:
        self.route = route
        self.request_id = request_id
        self.trace = trace
        self.deadline = deadline
        self.moved = False

    async def replace(self, route: Route) -> None:
        old, self.route = self.route, route
        await old.frames.aclose()

    async def close(self) -> None:
        await self.route.frames.aclose()


@dataclass
class Completion:
    """One started request: its model, and its events."""

    service: CompletionService
    request: CompletionRequest
    caller: Caller
    model: str  # the engine's id for it
    _events: AsyncIterator[Event]

    def events(self) -> AsyncIterator[Event]:
        return self._events

    async def result(self) -> Done:
        """The whole answer (for fronts that do not stream)."""
        async for event in self._events:
            if isinstance(event, Done):
                return event
        raise RuntimeError("the answer ended without a Done event")


async def _replayed(hit: CachedResult, safety: SafetyFilter) -> AsyncIterator[Event]:
    """A cached answer, screened by the policy in force now."""
    if safety.checks_output:
        screened = safety.screen(hit.text, "output")
        reason = hit.finish_reason if screened.blocked is None else CONTENT_FILTER
        hit = CachedResult(screened.text, reason, hit.usage, hit.logprobs)
    yield TextDelta(hit.text, hit.logprobs)
    yield Done(hit.finish_reason, hit.usage, hit.text, [], hit.logprobs)


def _released(out: Released, answer: Answer | None) -> list[Event]:
    """The events of what one frame released: text (with its token's logprob when asked, one
    event per token even when the filter holds the text back), then tool-call deltas."""
    events: list[Event] = []
    if answer is not None and answer.logprobs is not None:
        events.append(TextDelta(out.text, tuple(answer.logprobs[-1:])))
    elif out.text:
        events.append(TextDelta(out.text))
    if out.tool_calls:
        events.append(ToolCallDelta(out.tool_calls))
    return events


def _route(caller: Caller, where: str) -> None:
    if caller.on_route is not None:
        caller.on_route(where)


def _screen(req: CompletionRequest, safety: SafetyFilter) -> CompletionRequest:
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


def _bad_unicode() -> ApiError:
    return invalid(None, "the request contains text that is not valid Unicode (a lone surrogate)")
