"""Where a generation request is served: the local engine first, the cloud (offload over MQTT)
when the gateway cannot serve it well.

A request is offloaded, with the reason counted, when
- `busy`: the engine answered that its queue is full;
- `wait`: the engine's estimated queue wait (its last status, read every status_interval_s)
  is above `[offload] max_wait_s`;
- `unreachable`: the engine is down, restarting, or its connection broke before the first token;
- `error`: the engine failed internally before the first token;
- `breaker`: the local path's circuit breaker is open (repeated failures; a probe is let
  through after the cool-down);
- `thermal`, `memory`: the device is over `max_cpu_temp_c` / `max_memory_percent` (psutil).

The cloud path has its own breaker (timeouts, lost broker, worker failures). An offload that
fails before anything reached the client is retried on the local engine (`retry_local`) unless
the local path is known to be down; one that fails after the first streamed token ends the
stream with an error event. When neither path can take a request: 503 with Retry-After.

Without an offloader (no broker configured) the router is the plain local path, exactly as
before: the engine's errors reach the client as they are."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_runtime.client import CONNECTION_LOST, Busy, EngineError
from edge_wire.frames import BUSY, INTERNAL, SHUTTING_DOWN

from .breaker import OPEN, Breaker
from .engine_link import EngineLink
from .errors import SERVER, ApiError, from_engine, unavailable

if TYPE_CHECKING:
    from ..offload import MqttMetrics, OffloadConfig, Offloader
    from .request import CompletionRequest

log = logging.getLogger("proxy.router")

LOCAL, CLOUD, CACHE = "local", "cloud", "cache"
CLOUD_PROVEN_S = 300.0  # an offload answered this recently: the cloud path counts as serving (/readyz) without presence
FIRST_FRAME_MARGIN_S = 2.0  # past the request's own deadline, waiting for the engine's first frame stops
# The cloud's error codes that mean "this path could not serve it now" (anything else is about the request).
_CLOUD_RETRYABLE = frozenset({BUSY, SHUTTING_DOWN, INTERNAL, "unavailable", "expired", CONNECTION_LOST})
_CLOUD_FAILURES = frozenset({INTERNAL, "unavailable", SHUTTING_DOWN})  # count against the cloud breaker
_CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal", "acpitz", "tegra")

_WORKER_DEATHS = frozenset({"worker_lost", "silent"})  # another worker may serve what the dead one held
_ENGINE_LOST = frozenset({CONNECTION_LOST, SHUTTING_DOWN})  # the engine died or is restarting: another path may serve

Cancel = Callable[[], Awaitable[None]]
ServedBy = Callable[[str], None]


class PathLost(Exception):
    """A request's path failed in a way another path could serve it: the engine died or is
    restarting, a cloud worker died, fell silent or is stopping, the broker went away. `error`:
    what the client gets when the request cannot be moved; `reason`: what happened."""

    def __init__(self, error: ApiError, route: str, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.route = route
        self.reason = reason


@dataclass
class Plan:
    route: str  # LOCAL or CLOUD: where the request goes first
    reason: str | None = None  # why CLOUD
    engine: Any = None  # offload off: the connected engine client


@dataclass
class Route:
    frames: AsyncIterator[dict[str, Any]]  # the engine's frames: token frames, then the done frame
    cancel: Cancel  # stop the answer early (its stream then ends with a done frame)
    served_by: str  # LOCAL or CLOUD (a failed offload retried locally ends up LOCAL)
    reason: str | None = None  # why it was offloaded


class Health:
    """The engine's last status and the device's sensors, read in the background."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self.estimated_wait_s: float | None = None
        self.status_at = -math.inf  # monotonic time of the last status answer
        self.cpu_temp_c: float | None = None
        self.memory_percent: float | None = None
        self.read_temperature: Callable[[], float | None] = cpu_temperature  # replaceable (tests)
        self.read_memory: Callable[[], float | None] = memory_percent

    async def sample(self, config: OffloadConfig) -> None:
        status = await self.link.status(timeout_s=max(0.05, min(1.0, config.status_interval_s)))
        if status is not None:
            self.note_wait(status.get("estimated_wait_s"))
        try:
            self.memory_percent = self.read_memory() if config.max_memory_percent else None
            self.cpu_temp_c = await asyncio.to_thread(self.read_temperature) if config.max_cpu_temp_c else None
        except Exception as exc:  # a sensor that fails must not stop the router
            log.debug("sensor read failed", extra={"error": str(exc)})

    def note_wait(self, wait: Any) -> None:
        if isinstance(wait, (int, float)) and not isinstance(wait, bool):
            self.estimated_wait_s = float(wait)
            self.status_at = time.monotonic()

    def wait_s(self, max_age_s: float) -> float | None:
        """The estimated wait, if the status saying it is recent."""
        return self.estimated_wait_s if time.monotonic() - self.status_at <= max_age_s else None


def memory_percent() -> float:
    import psutil  # (only a gateway that offloads reads the sensors)

    return psutil.virtual_memory().percent


def cpu_temperature() -> float | None:
    """The hottest CPU sensor in °C (any sensor when none is recognisably the CPU's); None without sensors."""
    import psutil

    read = getattr(psutil, "sensors_temperatures", None)
    sensors = read() if read is not None else {}
    if not sensors:
        return None
    chosen = {name: entries for name, entries in sensors.items() if any(name.startswith(c) for c in _CPU_SENSORS)} or sensors
    values = [entry.current for entries in chosen.values() for entry in entries if entry.current is not None]
    return max(values) if values else None


class Router:
    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self.offloader: Offloader | None = None
        self.config: OffloadConfig | None = None
        self.metrics: MqttMetrics | None = None
        self.local = Breaker(LOCAL)
        self.cloud = Breaker(CLOUD)
        self.health = Health(link)
        self._cloud_ok_at = -math.inf  # monotonic time of the last offload answered in full
        self._monitor: asyncio.Task[None] | None = None
        # A reconnect is the engine announcing itself; its status and models answers were the probe.
        link.on_connect.append(self.local.success)

    # -- setup --------------------------------------------------------------------------------

    def enable_offload(self, offloader: Offloader, config: OffloadConfig, metrics: MqttMetrics | None = None) -> None:
        self.offloader = offloader
        self.metrics = metrics
        offloader.on_worker_online = lambda _worker: self.cloud.probe_now()  # the next request is the probe
        self.configure(config)
        if metrics is not None:
            metrics.watch(self.local)
            metrics.watch(self.cloud)

    def configure(self, config: OffloadConfig) -> None:
        """Apply `[offload]` (also live, when a controller pushes new bounds)."""
        self.config = config
        for breaker in (self.local, self.cloud):
            breaker.failures = config.breaker_failures
            breaker.cooldown_s = config.breaker_cooldown_s

    def start(self) -> None:
        if self.offloader is not None and self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None

    async def _watch(self) -> None:
        while True:
            config = self.config
            try:
                await self.health.sample(config)
            except Exception:
                log.exception("health sample failed")
            await asyncio.sleep(config.status_interval_s)

    @property
    def offloading(self) -> bool:
        return self.offloader is not None and self.config is not None and self.config.enabled

    @property
    def cloud_ready(self) -> bool:
        """Could a request be offloaded now? (for /readyz and model resolution)"""
        return self.offloading and self.offloader.available and self.cloud.state != OPEN

    def cloud_refusal(self) -> str | None:
        """Why a request could not be offloaded now (None: it could). A broker connection alone
        does not say that any worker listens: a worker online (its presence), or an offload
        answered lately (workers that do not announce themselves), does."""
        if not self.offloading:
            return "offload is off"
        if not self.offloader.client.connected:
            return "the broker is unreachable"
        if not self.offloader.available:
            return "no offload secret" if self.offloader.auth == "refused" else "the cloud path is full (max_in_flight)"
        if self.cloud.state == OPEN:
            return "the cloud path's circuit breaker is open"
        if self.offloader.workers_online == 0 and time.monotonic() - self._cloud_ok_at >= CLOUD_PROVEN_S:
            return "no cloud worker is online"
        return None

    # -- routing ------------------------------------------------------------------------------

    async def plan(self) -> Plan:
        """The first decision, before anything is sent: local (with the connected engine when
        offload is off, else the 503 of an engine that is down), or cloud with a reason."""
        if not self.offloading:
            return Plan(LOCAL, engine=await self.link.client())
        reason = self._preflight()
        if reason is None and not self.local.allow():  # (allow() lets the half-open probe through)
            reason = "breaker"
        return Plan(LOCAL if reason is None else CLOUD, reason)

    async def open(self, plan: Plan, req: CompletionRequest, request_id: str, timeout_s: float, trace: dict[str, str] | None,
                   served_by: ServedBy | None = None) -> Route:
        """The route for one request. A local route's first frame has been awaited already (that
        is how a full queue is learned); a local answer the engine refused for a reason about
        the request (bad value, prompt too long) raises that error from the route's frames, as
        the engine's own stream would."""
        if plan.engine is not None:
            return self._local_route(plan.engine, req, request_id, timeout_s, trace)
        reason = plan.reason
        local_error: BaseException | None = None
        if reason is None:
            route, local_error, reason = await self._try_local(req, request_id, timeout_s, trace)
            if route is not None:
                return route
        if self._cloud_allowed():
            if self.metrics is not None:
                self.metrics.offload(reason)
            log.debug("offloading", extra={"request_id": request_id, "reason": reason})
            return self._cloud_route(req, request_id, timeout_s, trace, reason, served_by)
        if local_error is not None:
            return Route(_raising(local_error), _nothing, LOCAL)
        if reason in ("thermal", "memory", "wait"):  # the engine is up: better slow or hot than refused
            return await self._local_anyway(req, request_id, timeout_s, trace)
        if self.metrics is not None:
            self.metrics.no_route.inc()
        retry = max(1.0, min(filter(None, (self.local.retry_after_s(), self.cloud.retry_after_s())), default=1.0))
        raise unavailable("neither the local engine nor the cloud can take this request now", retry, code="no_capacity")

    def _preflight(self) -> str | None:
        config, health = self.config, self.health
        if config.max_cpu_temp_c and health.cpu_temp_c is not None and health.cpu_temp_c > config.max_cpu_temp_c:
            return "thermal"
        if config.max_memory_percent and health.memory_percent is not None and health.memory_percent > config.max_memory_percent:
            return "memory"
        if config.max_wait_s:
            wait = health.wait_s(3 * config.status_interval_s + 1.0)
            if wait is not None and wait > config.max_wait_s:
                return "wait"
        return None

    def _cloud_allowed(self) -> bool:
        return self.offloader.available and self.cloud.allow()

    # -- the local path -----------------------------------------------------------------------

    def _local_route(self, engine: Any, req: CompletionRequest, request_id: str, timeout_s: float,
                     trace: dict[str, str] | None) -> Route:
        frames = engine.generate(**req.prompt, params=req.params, timeout_s=timeout_s, trace=trace, id=request_id,
                                 **req.structured.engine_fields())
        asked = [False]  # the service cancelled it (its `cancelled` ending is then no failure)

        async def cancel() -> None:
            asked[0] = True
            await engine.cancel(request_id)

        return Route(_local_frames(frames, req.prompt_field, asked), cancel, LOCAL)

    async def _try_local(self, req: CompletionRequest, request_id: str, timeout_s: float,
                         trace: dict[str, str] | None) -> tuple[Route | None, BaseException | None, str | None]:
        """(the local route, None, None), or (None, the engine's error, the reason to offload),
        or (a route raising the engine's error about the request, None, None)."""
        try:
            engine = await self.link.client()
        except ApiError as exc:
            self.local.failure()
            return None, exc, "unreachable"
        except BaseException:  # cancelled (the client went away): no verdict
            self.local.release()
            raise
        route = self._local_route(engine, req, request_id, timeout_s, trace)
        frames = route.frames
        try:
            async with asyncio.timeout(timeout_s + FIRST_FRAME_MARGIN_S):
                first = await anext(frames)
        except Busy as exc:
            self.local.success()  # it answered: busy is load, not failure
            self.health.note_wait(exc.estimated_wait_s)
            await frames.aclose()
            return None, exc, "busy"
        except PathLost as exc:  # the engine died or is restarting
            await frames.aclose()
            self.local.failure()
            return None, exc.error, "unreachable"
        except EngineError as exc:
            await frames.aclose()
            if exc.code == INTERNAL:
                self.local.failure()
                return None, exc, "error"
            self.local.success()
            return Route(_raising(exc), _nothing, LOCAL), None, None
        except StopAsyncIteration:
            self.local.failure()
            return None, EngineError(CONNECTION_LOST, "the engine ended the stream without a frame"), "unreachable"
        except TimeoutError:
            await frames.aclose()
            self.local.release()
            return Route(_raising(TimeoutError()), _nothing, LOCAL), None, None
        except BaseException:
            await frames.aclose()
            self.local.release()
            raise
        self.local.success()
        return Route(_prepend(first, frames), route.cancel, LOCAL), None, None

    async def _local_anyway(self, req: CompletionRequest, request_id: str, timeout_s: float, trace: dict[str, str] | None) -> Route:
        route, error, _ = await self._try_local(req, request_id, timeout_s, trace)
        return route if route is not None else Route(_raising(error), _nothing, LOCAL)

    # -- moving a request that lost its path ------------------------------------------------

    async def redispatch(self, route: Route, lost: PathLost, req: CompletionRequest, request_id: str, timeout_s: float,
                         trace: dict[str, str] | None, served_by: ServedBy | None = None) -> Route | None:
        """Another path for a request whose path was lost before its answer reached the client
        (the service calls this once per request): the cloud when the engine was lost; another
        worker when a worker died or fell silent and others are online, else the local engine
        (unless the local engine is what was down). None when no path can take it."""
        if not self.offloading:
            return None
        if route.served_by == LOCAL:
            if not self._cloud_allowed():
                return None
            if self.metrics is not None:
                self.metrics.offload("unreachable")
            return self._cloud_route(req, request_id, timeout_s, trace, "unreachable", served_by)
        reason = route.reason or "unreachable"
        if lost.reason in _WORKER_DEATHS and self.offloader.workers_online > 0 and self._cloud_allowed():
            if self.metrics is not None:
                self.metrics.offload(reason)
            return self._cloud_route(req, request_id, timeout_s, trace, reason, served_by)
        if not self._may_retry_locally(reason, lost.error):
            return None
        local, error, _ = await self._try_local(req, request_id, timeout_s, trace)
        if local is None:
            raise error if isinstance(error, ApiError) else from_engine(error, req.prompt_field)
        if self.metrics is not None:
            self.metrics.offload_fallbacks.inc()
        if served_by is not None:
            served_by(LOCAL)
        return local

    # -- the cloud path -----------------------------------------------------------------------

    def _cloud_route(self, req: CompletionRequest, request_id: str, timeout_s: float, trace: dict[str, str] | None,
                     reason: str, served_by: ServedBy | None) -> Route:
        offloader = self.offloader
        offload_id = offloader.offload_id(request_id)
        frames = self._cloud_frames(req, request_id, offload_id, timeout_s, trace)
        if served_by is not None:
            served_by(CLOUD)
        return Route(frames, functools.partial(offloader.cancel_async, offload_id), CLOUD, reason)

    async def _cloud_frames(self, req: CompletionRequest, request_id: str, offload_id: str, timeout_s: float,
                            trace: dict[str, str] | None) -> AsyncIterator[dict[str, Any]]:
        """The offloaded answer. A failure that another path could serve raises PathLost (the
        service moves the request when nothing of it reached the client)."""
        released = False  # a token of a streamed answer went on towards the client
        verdict = False
        model = self.link.model["id"] if self.link.model else req.model
        frames = self.offloader.generate(offload_id, kind=req.kind, model=model, prompt=req.prompt, params=req.params,
                                         timeout_s=timeout_s, trace=trace, **req.structured.engine_fields())
        try:
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    kind = frame.get("type")
                    if kind == "error":
                        verdict = True
                        failure = self._cloud_error(frame, released)
                        raise failure
                    if kind == "done" and frame.get("finish_reason") == "cancelled":  # the worker is stopping: no verdict
                        raise PathLost(_offload_error_of("lost", "the cloud worker stopped (it is shutting down)", released),
                                       CLOUD, "cancelled")
                    released = released or (req.stream and kind == "token")
                    yield frame
            self.cloud.success()
            self._cloud_ok_at = time.monotonic()
            verdict = True
        except _offload_failed() as exc:
            if exc.reason not in _WORKER_DEATHS:  # one worker dying says nothing of the others
                self.cloud.failure()
                verdict = True
            if self.metrics is not None:
                self.metrics.offload_failed(exc.reason)
            log.warning("offload failed", extra={"request_id": request_id, "reason": exc.reason, "error": exc.message,
                                                 "after_first_token": released})
            raise PathLost(_offload_error(exc, released), CLOUD, exc.reason) from None
        finally:
            if not verdict:
                self.cloud.release()

    def _cloud_error(self, frame: dict[str, Any], released: bool) -> PathLost | ApiError | EngineError:
        """What a worker's error frame means: PathLost when another path could serve the
        request, else the error about the request itself (the engine would refuse it too)."""
        code = frame.get("code")
        message = str(frame.get("message") or "the cloud worker failed")
        if code in _CLOUD_FAILURES:
            self.cloud.failure()
        else:
            self.cloud.success()  # it answered, if only to say no
        if self.metrics is not None and code in _CLOUD_RETRYABLE:
            self.metrics.offload_failed("rejected")
        if code == "expired":
            return ApiError(504, "the request's deadline passed before a cloud worker could start it", type=SERVER,
                            code="timeout")
        if code in _CLOUD_RETRYABLE:
            wait = frame.get("estimated_wait_s")
            if released:
                error = ApiError(503, f"the cloud worker stopped this answer: {message}", type=SERVER, code="offload_interrupted")
            elif code == BUSY:
                error = unavailable(f"the cloud is busy: {message}", wait if isinstance(wait, (int, float)) else 1.0,
                                    code="engine_busy")
            else:
                error = unavailable(f"the cloud could not serve this request: {message}", 1.0, code="cloud_unavailable")
            return PathLost(error, CLOUD, str(code))
        param = frame.get("param") if isinstance(frame.get("param"), str) else None
        return EngineError(str(code), message, param)

    def _may_retry_locally(self, reason: str, failure: ApiError) -> bool:
        if not self.config.retry_local or reason in ("unreachable", "breaker", "error"):
            return False
        return failure.status != 504  # its deadline has passed


def _offload_failed() -> type[Exception]:
    from ..offload import OffloadFailed

    return OffloadFailed


def _offload_error(exc: Any, released: bool) -> ApiError:
    return _offload_error_of(exc.reason, exc.message, released)


def _offload_error_of(reason: str, message: str, released: bool) -> ApiError:
    """What the client gets when an offload fails: after the first streamed token the error
    event of a cut-off stream, before it a 503."""
    if released:
        status, code = (504, "offload_timeout") if reason == "timeout" else (503, "offload_interrupted")
        return ApiError(status, f"the offloaded answer was cut off: {message}", type=SERVER, code=code)
    return unavailable(f"the cloud could not serve this request: {message}", 1.0, code="cloud_unavailable")


async def _local_frames(frames: AsyncIterator[dict[str, Any]], prompt_param: str,
                        asked: list[bool]) -> AsyncIterator[dict[str, Any]]:
    """The engine's frames; its death (the connection lost) or its shutdown (the request
    cancelled by the engine itself, or refused `shutting_down`) raises PathLost."""
    async with contextlib.aclosing(frames):
        try:
            async for frame in frames:
                if frame.get("type") == "done" and frame.get("finish_reason") == "cancelled" and not asked[0]:
                    raise PathLost(unavailable("the engine stopped this request (it is shutting down)", 2.0), LOCAL,
                                   "cancelled")
                yield frame
        except EngineError as exc:
            if exc.code not in _ENGINE_LOST:
                raise
            raise PathLost(from_engine(exc, prompt_param), LOCAL, exc.code) from None


async def _prepend(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async with contextlib.aclosing(rest):
        yield first
        if first.get("type") != "token":
            return
        async for frame in rest:
            yield frame


async def _raising(error: BaseException) -> AsyncIterator[dict[str, Any]]:
    raise error
    yield {}  # an async generator that raises at its first step


async def _nothing() -> None:
    pass
