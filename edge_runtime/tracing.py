"""OpenTelemetry tracing for both processes, off by default and free when off: until `setup()`
(or a test's `install()`) turns it on, no OpenTelemetry module is imported and `tracer()` is
None, which is all that callers check. Also the W3C trace context as the plain map that the
engine frame and MQTT messages carry: {"traceparent": ..., "tracestate": ...}.

Config: the `[tracing]` table of the shared TOML file (enabled, exporter, endpoint, path,
service_name, sample_ratio). Spans are exported in batches, off the request path: to an
OTLP/HTTP collector (`exporter = "otlp"`), or as JSON lines on stderr (`"console"`) or appended
to a file (`"file"`, `path`), which need no collector (edge_runtime/span_lines.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta

from edge_wire.settings import Check, ConfigError, Table, Text, load_table, read_config_file

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

DEFAULT_ENDPOINT = "http://127.0.0.1:4318/v1/traces"
MAX_FIELD_CHARS = 512  # the engine protocol's bound on traceparent and tracestate
# Version 00 of https://www.w3.org/TR/trace-context/#traceparent-header (all-zero ids are invalid).
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}").fullmatch

Trace = dict[str, str]  # {"traceparent": ..., "tracestate"?: ...}


def _http_url(key: str, value: str) -> None:
    if not re.match(r"https?://[^/\s]+", value):
        raise ConfigError(f"{key}: must be an http:// or https:// URL, got {value!r}")


EXPORTERS = ("otlp", "console", "file")


class TracingConfig(Table):
    """Spans of both processes: to a collector over OTLP/HTTP (pip install 'edge-runtime[otlp]'),
    or as JSON lines on stderr or in a file (pip install 'edge-runtime[tracing]')."""

    enabled: Annotated[bool, Meta(description="trace requests through the sidecar, MQTT and the engine")] = False
    exporter: Annotated[Literal["otlp", "console", "file"], Meta(
        description="otlp: to the collector at endpoint; console: one JSON line per span on stderr; file: appended to path")] = "otlp"
    endpoint: Annotated[str, Meta(description="OTLP/HTTP traces URL of a collector"), Check(_http_url)] = DEFAULT_ENDPOINT
    path: Annotated[Text | None, Meta(description="exporter file: the JSON-lines file the spans are appended to (both processes)",
                                      examples=["/var/log/edge-runtime/spans.jsonl"])] = None
    service_name: Annotated[Text | None, Meta(description="default: the process's own name (edge-proxy, edge-runtime)",
                                              examples=["edge-proxy-gw-0042"])] = None
    sample_ratio: Annotated[float, Meta(ge=0, le=1, description="of new traces; a caller's sampled flag is followed as it is")] = 1.0

    def check(self) -> None:
        if self.exporter == "file" and self.path is None:
            raise ConfigError('path: exporter = "file" needs the file to append the spans to')

    def destination(self) -> str:
        """Where the spans go, in words (the start-up line says it)."""
        return {"otlp": self.endpoint, "console": "stderr", "file": str(self.path)}[self.exporter]


def load_tracing_config(path: Path | None = None) -> TracingConfig:
    """The `[tracing]` table of the config file (defaults without a file or a table)."""
    data, path = read_config_file(path)
    return load_table(TracingConfig, data, "tracing", path)


# ---------------------------------------------------------------------------------------------- state

_provider: TracerProvider | None = None
_tracers: dict[str, Tracer] = {}
_w3c: Any = None  # the W3C propagator and get_current_span, imported when tracing turns on
_current_span: Any = None


def enabled() -> bool:
    return _provider is not None


def tracer(scope: str) -> Tracer | None:
    """The tracer of an instrumentation scope ("proxy", "edge_runtime") while tracing is on, else None."""
    if _provider is None:
        return None
    found = _tracers.get(scope)
    if found is None:
        found = _tracers[scope] = _provider.get_tracer(scope)
    return found


def setup(config: TracingConfig, service_name: str) -> None:
    """Turn tracing on as `config` says (nothing at all when it is off): spans are sampled at
    sample_ratio and exported in batches from a background thread."""
    if not config.enabled:
        return
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError("[tracing] enabled: OpenTelemetry is not installed (pip install 'edge-runtime[tracing]')") from None
    provider = _new_provider(config.service_name or service_name, config.sample_ratio)
    provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    _use(provider)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter != "otlp":
        from .span_lines import JsonLinesExporter

        return JsonLinesExporter.to_stderr() if config.exporter == "console" else JsonLinesExporter.to_file(Path(config.path or ""))
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError("[tracing] exporter = \"otlp\": the OTLP exporter is not installed "
                          "(pip install 'edge-runtime[otlp]'), or set exporter = \"console\" or \"file\"") from None
    return OTLPSpanExporter(endpoint=config.endpoint)


def install(exporter: SpanExporter, service_name: str = "edge-runtime", sample_ratio: float = 1.0) -> TracerProvider:
    """Turn tracing on with spans handed to `exporter` as each ends (tests pass opentelemetry's
    InMemorySpanExporter); returns the provider. `shutdown()` turns it off again."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = _new_provider(service_name, sample_ratio)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _use(provider)
    return provider


def shutdown() -> None:
    """Export what is buffered and turn tracing off."""
    global _provider
    provider, _provider = _provider, None
    _tracers.clear()
    if provider is not None:
        provider.shutdown()


def _new_provider(service_name: str, sample_ratio: float) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    # Our own provider, not the global one: an app embedding the engine keeps its own tracing.
    return TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
                          resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False)


def _use(provider: TracerProvider) -> None:
    global _provider, _w3c, _current_span
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    shutdown()
    _w3c, _current_span = TraceContextTextMapPropagator(), get_current_span
    _provider = provider


# ---------------------------------------------------------------------------------------------- W3C trace context


def clean(traceparent: Any, tracestate: Any = None) -> Trace | None:
    """The trace context as it may be forwarded: a well-formed version-00 traceparent and, with
    it, a tracestate of at most 512 characters; None when there is no valid traceparent."""
    if not isinstance(traceparent, str) or not _TRACEPARENT(traceparent):
        return None
    if isinstance(tracestate, str) and tracestate and len(tracestate) <= MAX_FIELD_CHARS:
        return {"traceparent": traceparent, "tracestate": tracestate}
    return {"traceparent": traceparent}


def context_of(trace: Trace | None) -> Context | None:
    """The OpenTelemetry context whose remote parent is `trace`; None (a new trace) without one
    or while tracing is off."""
    if not trace or _provider is None:
        return None
    return _w3c.extract(trace)


def current_trace() -> Trace | None:
    """The current span's context as a W3C map, to send along; None when tracing is off or no
    span is current."""
    if _provider is None:
        return None
    carrier: Trace = {}
    _w3c.inject(carrier)
    return carrier or None


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for log lines; None when tracing is off
    or no span is current."""
    if _provider is None:
        return None
    context = _current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
