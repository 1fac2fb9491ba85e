"""The sidecar's aiohttp application: routes, the middleware that stamps, measures and turns
every failure into an OpenAI error body, the guards in front of /v1 (key, rate limit, content
type, body size), and the operations endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from typing import Any

from aiohttp import web, web_server
from aiohttp.abc import AbstractAccessLogger

from edge_runtime import tracing

from .. import spans
from ..auth.keys import Grant
from ..compose import Parts, build
from ..config import ProxyConfig
from ..core.breaker import OPEN
from ..core.errors import JSON_CONTENT, SERVER, ApiError, from_http, invalid, status_error
from ..core.request import CompletionRequest
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .bounds import ConnectionLimits, bound
from .completions import respond
from .openai_schema import parse_chat, parse_completion
from .openapi import document
from .request_state import CLIENT, GRANT, KEY_ID, REQUEST_ID, SERVED_BY, START, TRACE_IDS

log = logging.getLogger("proxy.http")

SIDECAR = web.AppKey("sidecar", "Sidecar")
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}").fullmatch
_HEALTHY = b'{"status":"ok"}'
_READY_RETRY_AFTER = {"Retry-After": "1"}
DRAIN_S = 1.0  # on shutdown, how long open keep-alive connections may carry one last answer


class Sidecar:
    """The state one application serves from (the composed parts); its methods are the handlers."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.link = parts.link
        self.auth = parts.auth
        self.limiter = parts.limiter
        self.metrics = parts.metrics
        self.safety = parts.safety
        self.service = parts.service
        self.openapi = json.dumps(document(parts.config, self.auth.enabled)).encode()
        self.started = int(time.time())
        self.draining = False  # set when shutdown begins (SidecarRunner.cleanup)

    @property
    def config(self) -> ProxyConfig:
        """The config in force (a controller's push replaces it in the parts)."""
        return self.parts.config

    # -- middleware and guards ------------------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id")
        if request_id is None or not _VALID_REQUEST_ID(request_id):
            request_id = secrets.token_hex(16)
        request[REQUEST_ID] = request_id
        request[SERVED_BY] = "local"
        request[START] = start = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()
        try:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
                response = from_http(exc).response()
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away; the engine's work was cancelled on the way out
            raise
        except Exception:
            log.exception("request failed", extra={"request_id": request_id})
            return ApiError(500, "internal error", type=SERVER, code="internal_error").response()
        finally:
            self.metrics.in_flight.dec()
            resource = request.match_info.route.resource
            self.metrics.observe_request(resource.canonical if resource is not None else "unmatched", status,
                                         time.perf_counter() - start)

    def admit(self, request: web.Request) -> Grant | None:
        """API key or token, and rate limit: raise the 401, 403 or 429 ApiError. The Grant says
        what the caller may do (None without keys or tokens: anything)."""
        grant = None
        with spans.span("auth") as span:
            if self.auth.enabled:
                grant = request[GRANT] = self.auth.check(request.headers.get("Authorization"))
                client = request[KEY_ID] = grant.client
                if grant.tier is not None and grant.tier not in self.limiter.tiers:
                    raise ApiError(403, f"rate-limit tier {grant.tier!r} is not configured on this gateway",
                                   type="permission_error", code="unknown_tier")
            else:
                client = request.remote or "-"
            request[CLIENT] = client
            if span is not None:
                span.set_attribute("edge.client", client)
            if self.limiter.enabled:
                self.limiter.admit(client, grant.tier if grant is not None else None)
        return grant


    async def json_body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != JSON_CONTENT:
            raise status_error(415, f"Content-Type must be application/json, got {request.content_type!r}")
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise status_error(413, f"request body of {request.content_length} bytes exceeds the limit of {self.config.max_body_bytes} bytes")
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                raw = await request.read()  # past client_max_size aiohttp raises its 413
        except TimeoutError:
            raise status_error(408, f"request body not received within {self.config.body_timeout_s:g} s") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise invalid(None, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise invalid(None, "request body must be a JSON object", code="invalid_json")
        return body

    # -- /v1 --------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        grant = self.admit(request)
        body = await self.json_body(request)
        return await self._respond(request, grant, parse_chat(body, self.config.max_messages, self.config.max_prompt_chars))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        grant = self.admit(request)
        body = await self.json_body(request)
        return await self._respond(request, grant, parse_completion(body, self.config.max_prompt_chars))

    async def _respond(self, request: web.Request, grant: Grant | None, req: CompletionRequest) -> web.StreamResponse:
        return await respond(request, self.service, self.limiter, grant.authorize(req) if grant is not None else req)

    async def models(self, request: web.Request) -> web.Response:
        grant = self.admit(request)
        names = _allowed(await self._model_names(), grant)
        return _json({"object": "list", "data": [self._model(n) for n in names]})

    async def model(self, request: web.Request) -> web.Response:
        grant = self.admit(request)
        name = request.match_info["model"]
        if name not in _allowed(await self._model_names(), grant):
            raise ApiError(404, f"model {name!r} does not exist; see /v1/models", param="model", code="model_not_found")
        return _json(self._model(name))

    async def _model_names(self) -> list[str]:
        """The engine's model (as last met: kept while the engine is away) and its aliases; the
        aliases alone while the engine was never met but the cloud can serve them."""
        if self.link.model is None:
            try:
                await self.link.client()  # learns the model on connecting, or raises 503
            except ApiError:
                if not self.config.model_aliases or self.parts.router.cloud_refusal() is not None:
                    raise
                return list(self.config.model_aliases)
        return [self.link.model["id"], *self.config.model_aliases]

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "edge-runtime"}

    # -- operations -------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=_HEALTHY, content_type=JSON_CONTENT)

    async def readyz(self, request: web.Request) -> web.Response:
        ready = await self._readiness()
        return _json(ready) if ready["status"] == "ready" else _json(ready, 503, _READY_RETRY_AFTER)

    async def health(self, request: web.Request) -> web.Response:
        """/health as vLLM, TGI and llama.cpp's server answer it: 200 while requests can be
        served (the same test as /readyz), else 503 with the reason."""
        ready = await self._readiness()
        if ready["status"] == "ready":
            return web.Response(body=_HEALTHY, content_type=JSON_CONTENT)
        return _json(ready, 503, _READY_RETRY_AFTER)

    async def _readiness(self) -> dict[str, Any]:
        """What a request sent now would get (docs/reliability.md): ready with the route it
        would take, or unavailable with why every path refuses it."""
        status = await self.link.status()
        self.metrics.set_engine_status(status)
        router = self.parts.router
        local = _local_refusal(status)
        if local is None and router.offloading and router.local.state == OPEN:
            local = "the local path's circuit breaker is open"
        if local is None:
            return {"status": "ready", "route": "local", "model": status["model"]["id"],
                    "queue_depth": status.get("queue_depth", 0), "running": status.get("running", 0)}
        if not router.offloading:
            return {"status": "unavailable", "reason": local}
        cloud = router.cloud_refusal()
        if cloud is None:
            return {"status": "ready", "route": "cloud"}
        return {"status": "unavailable", "reason": f"{local}; {cloud}"}

    async def metrics_text(self, request: web.Request) -> web.Response:
        self.metrics.set_engine_status(await self.link.status(timeout_s=0.5))
        cache = self.service.cache
        if cache is not None:
            self.metrics.cache_entries.set(len(cache))
            self.metrics.cache_bytes.set(cache.bytes)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type=JSON_CONTENT)

    async def close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        """While shutting down, every answer says `Connection: close`: a client then opens a new
        connection (to another gateway) instead of sending into one about to be closed, where it
        could not know whether its request was read."""
        if self.draining:
            response.force_close()
            response.headers["Connection"] = "close"  # the hook runs after aiohttp wrote its own header


def _local_refusal(status: dict[str, Any] | None) -> str | None:
    """Why the engine would not take a request now (None: it would), from its status answer."""
    if status is None:
        return "the engine is unreachable"
    if status.get("shutting_down"):
        return "the engine is shutting down"
    if not (status.get("model") or {}).get("id"):
        return "the engine has no model loaded"
    return None


def _allowed(names: list[str], grant: Grant | None) -> list[str]:
    return names if grant is None or grant.models is None else [n for n in names if n in grant.models]


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(obj).encode(), status=status, content_type=JSON_CONTENT, headers=headers)


async def _stamp(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Every answer, errors and streams included, says its request id and where it was served."""
    request_id = request.get(REQUEST_ID)
    if request_id is None:  # answered before the middleware ran (a malformed HTTP request)
        request_id = request[REQUEST_ID] = secrets.token_hex(16)
    response.headers["x-request-id"] = request_id
    response.headers["x-served-by"] = request.get(SERVED_BY, "local")


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request (the root logger's JsonFormatter renders the fields)."""

    @property
    def enabled(self) -> bool:
        """Below info level (log_level = "warning") the line is not even built."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "request_id": request.get(REQUEST_ID), "method": request.method, "path": request.path,
            "status": response.status, "duration_ms": round(time * 1000, 3), "served_by": request.get(SERVED_BY),
            "key_id": request.get(KEY_ID), "remote": request.remote, "bytes": response.body_length,
        }
        ids = request.get(TRACE_IDS)  # the request's span has ended by now: name it explicitly
        if ids is not None:
            fields["trace_id"], fields["span_id"] = ids
        self.logger.info("request", extra=fields)


def build_app(config: ProxyConfig, parts: Parts | None = None) -> web.Application:
    sidecar = Sidecar(parts or build(config))
    # The tracing middleware exists only while tracing is on: off, requests never meet it.
    middlewares = [spans.middleware, sidecar.guard] if tracing.enabled() else [sidecar.guard]
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[SIDECAR] = sidecar
    app.router.add_post("/v1/chat/completions", sidecar.chat_completions)
    app.router.add_post("/v1/completions", sidecar.completions)
    app.router.add_get("/v1/models", sidecar.models)
    app.router.add_get("/v1/models/{model}", sidecar.model)
    app.router.add_get("/healthz", sidecar.healthz)
    app.router.add_get("/readyz", sidecar.readyz)
    app.router.add_get("/health", sidecar.health)
    app.router.add_get("/metrics", sidecar.metrics_text)
    app.router.add_get("/openapi.json", sidecar.openapi_json)
    app.on_response_prepare.append(_stamp)
    app.on_response_prepare.append(sidecar.close_when_draining)

    async def engine_link(app: web.Application):
        sidecar.link.start()
        yield
        await sidecar.link.close()

    app.cleanup_ctx.append(engine_link)
    return app


class SidecarRunner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        config = self.app[SIDECAR].config
        return bound(await super()._make_server(), ConnectionLimits(config.max_connections, config.header_timeout_s))

    async def cleanup(self) -> None:
        """Stop listening (new connections are refused: clients go elsewhere, knowing nothing was
        sent), then give open connections DRAIN_S to carry one more answer, each saying
        `Connection: close`, before the idle ones are closed under their clients."""
        for site in list(self.sites):
            await site.stop()
        self.app[SIDECAR].draining = True  # (not before: clients would open new connections into the closing listener)
        deadline = asyncio.get_running_loop().time() + min(DRAIN_S, self.app[SIDECAR].config.grace_s)
        while self.server is not None and self.server.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await super().cleanup()


def make_runner(app: web.Application, config: ProxyConfig) -> web.AppRunner:
    """Handlers are cancelled when their client disconnects: that is what cancels engine work
    for a client gone mid-request. Requests in flight get grace_s to finish on shutdown."""
    return SidecarRunner(
        app, handler_cancellation=True, shutdown_timeout=config.grace_s, access_log_class=AccessLogger,
        keepalive_timeout=config.idle_timeout_s,
        access_log=logging.getLogger("proxy.access") if config.access_log else None,
    )
