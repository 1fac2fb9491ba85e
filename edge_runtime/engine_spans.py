"""The engine's spans for one generate request: `engine.generate` (child of the trace context in
the frame), with `engine.queue` (waiting for a KV slot), `engine.prefill` (to the first token)
and `engine.decode` (the rest) under it. They are made after the request ends, from timestamps
taken on the way, on the event loop: the engine thread never touches tracing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import tracing
from .scheduler import Request

SCOPE = "edge_runtime"
_FAILED = frozenset({"error", "deadline"})


@dataclass
class Timeline:
    """What one traced request needs remembered until it ends (only made while tracing is on)."""

    trace: dict[str, str] | None  # the frame's trace context
    received: float = field(default_factory=time.monotonic)
    submitted: float | None = None
    request: Request | None = None  # the scheduler notes admitted_at and cached_tokens in it

    def submit(self, request: Request) -> None:
        self.submitted = time.monotonic()
        self.request = request


def record(timeline: Timeline, request_id: str, frame: dict[str, Any]) -> None:
    """Make the spans of a request that ended with `frame` (its done or error frame)."""
    tracer = tracing.tracer(SCOPE)
    if tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    end = time.monotonic()
    offset = time.time_ns() - int(end * 1e9)  # monotonic seconds -> wall-clock ns, the clock spans use

    def ns(t: float) -> int:
        return int(t * 1e9) + offset

    root = tracer.start_span("engine.generate", context=tracing.context_of(timeline.trace), kind=SpanKind.SERVER,
                             start_time=ns(timeline.received), attributes={"edge.request_id": request_id})
    if frame.get("type") == "error":
        root.set_attribute("edge.error_code", frame.get("code", ""))
        root.set_status(Status(StatusCode.ERROR, frame.get("message")))
    else:
        usage, timings, reason = frame.get("usage", {}), frame.get("timings", {}), frame.get("finish_reason", "")
        root.set_attributes({
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens", 0),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens", 0),
            "edge.finish_reason": reason,
        })
        if reason in _FAILED:
            root.set_status(Status(StatusCode.ERROR, reason))
        if timeline.submitted is not None:
            _phases(tracer, root, timeline, ns, end, usage, timings)
    root.end(end_time=ns(end))


def _phases(tracer: Any, root: Any, timeline: Timeline, ns: Any, end: float, usage: dict[str, int],
            timings: dict[str, float]) -> None:
    from opentelemetry.trace import set_span_in_context

    parent = set_span_in_context(root)
    request = timeline.request
    admitted = request.admitted_at if request is not None else None
    queue = tracer.start_span("engine.queue", context=parent, start_time=ns(timeline.submitted))
    queue.end(end_time=ns(admitted if admitted is not None else end))
    if admitted is None:
        return  # ended while queued (cancelled, deadline, shutdown)
    ttft = timings.get("ttft_s", 0.0)
    first_token = timeline.submitted + ttft if ttft > 0 else end
    first_token = min(max(first_token, admitted), end)
    prefill = tracer.start_span("engine.prefill", context=parent, start_time=ns(admitted), attributes={
        "gen_ai.usage.input_tokens": usage.get("prompt_tokens", 0),
        "edge.cached_prompt_tokens": request.cached_tokens,
    })
    prefill.end(end_time=ns(first_token))
    if ttft > 0:
        decode = tracer.start_span("engine.decode", context=parent, start_time=ns(first_token), attributes={
            "gen_ai.usage.output_tokens": usage.get("completion_tokens", 0),
            "edge.decode_tokens_per_s": timings.get("decode_tokens_per_s", 0.0),
        })
        decode.end(end_time=ns(end))
