"""Tracing end to end: a request sent to the running sidecar with a W3C traceparent produces
spans (in opentelemetry-sdk's in-memory exporter) for the HTTP request, auth, cache lookup,
route decision and engine call in the sidecar, and engine.generate / queue / prefill / decode in
the engine (in-process, so the one exporter sees both), all in the caller's trace; trace ids in
the JSON logs; nothing of OpenTelemetry loaded while tracing is off."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from engine_harness import Engine
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from proxy_harness import Proxy

from edge_runtime import tracing
from edge_runtime.logs import JsonFormatter
from proxy.auth.keys import hash_key
from proxy.config import ProxyConfig

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"
USER = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="et-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    tracing.install(spans)
    yield spans
    tracing.shutdown()


def post(proxy: Proxy, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    async def main():
        async with aiohttp.ClientSession() as s, s.post(f"{proxy.url}/v1/chat/completions", json=body,
                                                        headers={"Authorization": "Bearer k1", **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()

    return asyncio.run(asyncio.wait_for(main(), 60))


def wait_for(exporter: InMemorySpanExporter, names: set[str], timeout_s: float = 10.0) -> dict:
    """The finished spans by name, once all of `names` have ended (the request span ends just
    after the last byte of a stream is written)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = exporter.get_finished_spans()
        by_name = {}
        for s in spans:
            by_name.setdefault(s.name, s)
        if names <= by_name.keys() or time.monotonic() > deadline:
            assert names <= by_name.keys(), f"missing spans: {names - by_name.keys()}"
            return by_name
        time.sleep(0.02)


def test_one_trace_across_sidecar_and_engine(engine, exporter):
    with Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",), api_keys=(hash_key("k1"),))) as p:
        body = {"model": "tiny", "messages": USER, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        status, _, _ = post(p, body, {"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
        assert status == 200
        spans = wait_for(exporter, {"POST /v1/chat/completions", "auth", "cache.lookup", "route", "engine.generate",
                                    "engine.queue", "engine.prefill", "engine.decode"})
        finished = exporter.get_finished_spans()
        assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}

        http = spans["POST /v1/chat/completions"]
        assert http.kind == SpanKind.SERVER and format(http.parent.span_id, "016x") == PARENT and http.parent.is_remote
        assert http.attributes["http.response.status_code"] == 200 and http.attributes["edge.served_by"] == "local"
        for name in ("auth", "cache.lookup", "route"):
            assert spans[name].parent.span_id == http.context.span_id
        assert spans["cache.lookup"].attributes["edge.cache.hit"] is False
        assert spans["route"].attributes["edge.route"] == "local"

        calls = [s for s in finished if s.name == "engine.generate"]
        client = next(s for s in calls if s.kind == SpanKind.CLIENT)
        server = next(s for s in calls if s.kind == SpanKind.SERVER)
        assert client.parent.span_id == http.context.span_id
        assert server.parent.span_id == client.context.span_id  # the context crossed the engine socket
        assert client.attributes["gen_ai.usage.output_tokens"] == 6 == server.attributes["gen_ai.usage.output_tokens"]
        for name in ("engine.queue", "engine.prefill", "engine.decode"):
            assert spans[name].parent.span_id == server.context.span_id
        assert spans["engine.prefill"].attributes["gen_ai.usage.input_tokens"] > 0
        assert spans["engine.decode"].attributes["gen_ai.usage.output_tokens"] == 6
        assert spans["engine.queue"].end_time <= spans["engine.prefill"].start_time <= spans["engine.decode"].start_time
        assert server.start_time >= client.start_time and server.end_time <= client.end_time + 10**6

        exporter.clear()  # the same request again: answered from the cache, the engine untouched
        status, headers, _ = post(p, {**body, "stream": True}, {"traceparent": TRACEPARENT})
        assert status == 200 and headers["x-served-by"] == "cache"
        spans = wait_for(exporter, {"POST /v1/chat/completions", "cache.lookup"})
        assert spans["cache.lookup"].attributes["edge.cache.hit"] is True
        assert "engine.generate" not in spans and spans["POST /v1/chat/completions"].attributes["edge.served_by"] == "cache"

        exporter.clear()  # no traceparent: the sidecar starts the trace, and the engine joins it
        assert post(p, {**body, "max_tokens": 2})[0] == 200
        spans = wait_for(exporter, {"POST /v1/chat/completions", "engine.decode"})
        assert spans["POST /v1/chat/completions"].parent is None
        assert len({s.context.trace_id for s in exporter.get_finished_spans()}) == 1

        exporter.clear()  # refused requests are traced too, with the reason on the auth span
        status, _, _ = post(p, body, {"traceparent": TRACEPARENT, "Authorization": "Bearer wrong"})
        spans = wait_for(exporter, {"POST /v1/chat/completions", "auth"})
        assert status == 401 and spans["auth"].status.description.endswith("incorrect API key")


def test_unsampled_callers_make_no_spans(engine, exporter):
    with Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",))) as p:
        status, _, _ = post(p, {"model": "tiny", "messages": USER, "max_tokens": 2}, {"traceparent": f"00-{TRACE_ID}-{PARENT}-00"})
        assert status == 200
        time.sleep(0.2)
        assert exporter.get_finished_spans() == ()


def test_log_lines_carry_trace_and_span_ids(engine, exporter, caplog):
    line = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(JsonFormatter().format(line))
    with tracing.tracer("test").start_as_current_span("work") as span:
        entry = json.loads(JsonFormatter().format(line))
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(span.get_span_context().span_id, "016x")

    caplog.set_level(logging.INFO, logger="proxy.access")
    with Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",))) as p:
        post(p, {"model": "tiny", "messages": USER, "max_tokens": 2}, {"traceparent": TRACEPARENT})
    access = [r for r in caplog.records if r.name == "proxy.access"]
    assert access and access[-1].trace_id == TRACE_ID and len(access[-1].span_id) == 16


def test_tracing_off_loads_nothing_and_passes_the_context_through():
    code = """
import sys
from aiohttp import web
from proxy.http.app import build_app, SIDECAR
from proxy.config import ProxyConfig
from proxy import spans
import edge_runtime.server, edge_runtime.cli, proxy.main
app = build_app(ProxyConfig())
assert app.middlewares == (app[SIDECAR].guard,) or list(app.middlewares) == [app[SIDECAR].guard], app.middlewares
tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
assert spans.outgoing({"traceparent": tp, "tracestate": "a=1"}) == {"traceparent": tp, "tracestate": "a=1"}
assert spans.outgoing({"traceparent": "garbage"}) is None and spans.outgoing({}) is None
with spans.span("x") as s:
    assert s is None
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") or m == "jwt")
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
