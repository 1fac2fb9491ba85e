"""The W3C trace context on MQTT messages, so that a request that travels device -> gateway ->
cloud worker stays one trace: MQTT v5 carries it in user properties named `traceparent` and
`tracestate`; on MQTT 3.1.1 (no properties) it rides in the payload as a `trace` map,
{"traceparent": ..., "tracestate": ...}, the same map the engine's generate frame carries.

Sending: `to_user_properties(trace)` (v5) or `to_payload(payload, trace)` (3.1.1), with
`trace = edge_runtime.tracing.current_trace()` inside the span of the hop (or, while tracing is
off, the trace received with the request, passed on unchanged). Receiving: `from_message(...)`
then `edge_runtime.tracing.context_of(trace)` as the parent of the consumer's span. Malformed
values are dropped (a new trace starts), never an error: a device's bad header costs its trace,
not its request."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from edge_runtime.tracing import Trace, clean

PAYLOAD_FIELD = "trace"
_KEYS = ("traceparent", "tracestate")


def to_user_properties(trace: Trace | None) -> tuple[tuple[str, str], ...]:
    """MQTT v5 user properties carrying `trace` (none without one)."""
    if not trace:
        return ()
    return tuple((key, trace[key]) for key in _KEYS if key in trace)


def from_user_properties(pairs: Iterable[tuple[str, str]] | None) -> Trace | None:
    """The trace context in a v5 message's user properties (the first of each name counts)."""
    found: dict[str, str] = {}
    for key, value in pairs or ():
        if key in _KEYS and key not in found:
            found[key] = value
    return clean(found.get("traceparent"), found.get("tracestate"))


def to_payload(payload: dict[str, Any], trace: Trace | None) -> dict[str, Any]:
    """`payload` with the `trace` field set (for 3.1.1, where messages have no properties)."""
    if trace:
        payload[PAYLOAD_FIELD] = dict(trace)
    return payload


def from_payload(payload: Mapping[str, Any] | None) -> Trace | None:
    field = payload.get(PAYLOAD_FIELD) if isinstance(payload, Mapping) else None
    if not isinstance(field, Mapping):
        return None
    return clean(field.get("traceparent"), field.get("tracestate"))


def from_message(user_properties: Iterable[tuple[str, str]] | None, payload: Mapping[str, Any] | None) -> Trace | None:
    """A received message's trace context: v5 user properties first, else the payload field."""
    return from_user_properties(user_properties) or from_payload(payload)
