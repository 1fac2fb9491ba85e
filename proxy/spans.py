"""The sidecar's spans: one per HTTP request (a child of the caller's W3C traceparent), and under
it auth, cache lookup, route decision and the engine call, whose context rides to the engine in
the generate frame. While tracing is off the middleware is not installed and every helper here
returns at its first check, so a request pays for a global lookup and nothing more. While it is
on, leaf spans are started and ended without becoming the current span (cheaper by a third)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from edge_runtime import tracing

from .http.request_state import REQUEST_ID, SERVED_BY, TRACE_IDS

SCOPE = "proxy"
_NOOP = contextlib.nullcontext()  # reusable: entering it yields None
_api: Any = None  # the OpenTelemetry names used here, imported on first use (tracing on)


def _otel() -> Any:
    global _api
    if _api is None:
        from opentelemetry import context, trace

        _api = SimpleNamespace(attach=context.attach, detach=context.detach, in_context=trace.set_span_in_context,
                               current=trace.get_current_span, Status=trace.Status, ERROR=trace.StatusCode.ERROR,
                               SERVER=trace.SpanKind.SERVER, CLIENT=trace.SpanKind.CLIENT)
    return _api


class _Leaf:
    """A span that has no children: started, ended, never made current."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def __enter__(self) -> Any:
        return self.span

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if error is not None:
            self.span.set_status(_otel().Status(_otel().ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


def span(name: str) -> AbstractContextManager[Any]:
    """A leaf span under the current one; yields the span, or None while tracing is off."""
    tracer = tracing.tracer(SCOPE)
    return _NOOP if tracer is None else _Leaf(tracer.start_span(name))


def client_span(name: str) -> AbstractContextManager[Any]:
    """A span for a call to another process (the engine), current while the call lasts, so that
    `outgoing()` hands on its context."""
    tracer = tracing.tracer(SCOPE)
    return _NOOP if tracer is None else tracer.start_as_current_span(name, kind=_otel().CLIENT)


def outgoing(headers: Mapping[str, str]) -> tracing.Trace | None:
    """The trace context to send on to the engine: the current span's while tracing is on; else
    the caller's own traceparent passed through (when well-formed), so a traced engine or cloud
    worker still joins the caller's trace. `headers` holds the caller's W3C fields."""
    if tracing.enabled():
        return tracing.current_trace()
    traceparent = headers.get("traceparent")
    return None if traceparent is None else tracing.clean(traceparent, headers.get("tracestate"))


def note_usage(usage: Mapping[str, int]) -> None:
    """Token counts of a finished generation, on the current (engine call) span."""
    if not tracing.enabled():
        return
    _otel().current().set_attributes({
        "gen_ai.usage.input_tokens": usage.get("prompt_tokens", 0),
        "gen_ai.usage.output_tokens": usage.get("completion_tokens", 0),
    })


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The request's span, outermost so that it sees the status the guard settled on. Installed
    by build_app only while tracing is on."""
    tracer = tracing.tracer(SCOPE)
    if tracer is None:  # turned off since the app was built
        return await handler(request)
    api = _otel()
    headers = request.headers
    parent = tracing.context_of(tracing.clean(headers.get("traceparent"), headers.get("tracestate")))
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    span = tracer.start_span(f"{request.method} {route}", context=parent, kind=api.SERVER, attributes={
        "http.request.method": request.method, "http.route": route, "url.path": request.path})
    context = span.get_span_context()
    request[TRACE_IDS] = (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    token = api.attach(api.in_context(span))
    status = 499  # unless an answer comes: the client went away
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        span.set_status(api.Status(api.ERROR, "the client went away"))
        raise
    finally:
        api.detach(token)
        span.set_attributes({"http.response.status_code": status, "edge.request_id": request.get(REQUEST_ID, ""),
                             "edge.served_by": request.get(SERVED_BY, "local")})
        if status >= 500:
            span.set_status(api.Status(api.ERROR))
        span.end()
