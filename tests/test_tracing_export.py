"""Tracing's configuration (the `[tracing]` table), the real OTLP/HTTP export to a collector (a
local HTTP server standing in for one), and the trace-context helpers for MQTT messages (v5 user
properties, the 3.1.1 payload field) that the device front and offload use."""

from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp import web

from edge_runtime import tracing
from edge_wire.settings import ConfigError
from proxy.mqtt import trace as trace_mqtt

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_tracing_table(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[proxy]\nport = 8081\n")
    assert tracing.load_tracing_config(path) == tracing.TracingConfig() and not tracing.TracingConfig().enabled
    path.write_text('[tracing]\nenabled = true\nendpoint = "http://collector:4318/v1/traces"\nsample_ratio = 0.25\n')
    config = tracing.load_tracing_config(path)
    assert (config.enabled, config.endpoint, config.sample_ratio, config.service_name) == (
        True, "http://collector:4318/v1/traces", 0.25, None)
    for text, message in (('sample_ratio = 2', "sample_ratio: must be a number in [0, 1]"),
                          ('endpoint = "collector:4318"', "endpoint: must be an http:// or https:// URL"),
                          ('enabled = "yes"', "enabled: must be true or false"),
                          ('service_name = ""', "service_name: must be a non-empty string"),
                          ('colour = 1', "unknown key 'colour'")):
        path.write_text(f"[tracing]\n{text}\n")
        with pytest.raises(ConfigError, match=rf"\[tracing\] {message.replace('[', '.').replace(']', '.')}"):
            tracing.load_tracing_config(path)


def test_setup_off_does_nothing():
    tracing.setup(tracing.TracingConfig(), "edge-proxy")
    assert not tracing.enabled() and tracing.tracer("proxy") is None and tracing.current_trace() is None


def test_spans_are_exported_over_otlp_http():
    received: list[tuple[str, str, int]] = []
    loop = asyncio.new_event_loop()

    async def traces(request: web.Request) -> web.Response:
        received.append((request.path, request.content_type, len(await request.read())))
        return web.Response(status=200)

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    port = runner.addresses[0][1]
    try:
        tracing.setup(tracing.TracingConfig(enabled=True, endpoint=f"http://127.0.0.1:{port}/v1/traces",
                                            service_name="edge-test"), "edge-proxy")
        with tracing.tracer("test").start_as_current_span("exported"):
            pass
        tracing.shutdown()  # flushes the batch
        assert received and received[0][:2] == ("/v1/traces", "application/x-protobuf") and received[0][2] > 0
    finally:
        tracing.shutdown()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_mqtt_v5_user_properties_and_payload_field():
    trace = {"traceparent": TP, "tracestate": "vendor=1"}
    props = trace_mqtt.to_user_properties(trace)
    assert props == (("traceparent", TP), ("tracestate", "vendor=1"))
    assert trace_mqtt.from_user_properties([("other", "x"), *props, ("traceparent", "00-ignored")]) == trace
    assert trace_mqtt.to_user_properties(None) == ()
    payload = trace_mqtt.to_payload({"id": "r1"}, trace)
    assert payload == {"id": "r1", "trace": trace} and trace_mqtt.from_payload(payload) == trace
    assert trace_mqtt.from_message(props, {"trace": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}}) == trace
    assert trace_mqtt.from_message((), payload) == trace  # 3.1.1: the payload field
    for bad in ({"trace": {"traceparent": "garbage"}}, {"trace": "x"}, {}, None,
                {"trace": {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}}):
        assert trace_mqtt.from_message(None, bad) is None  # dropped: a new trace starts, the request goes on
    long_state = trace_mqtt.from_payload({"trace": {"traceparent": TP, "tracestate": "x" * 600}})
    assert long_state == {"traceparent": TP}


def test_mqtt_hops_continue_the_trace():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    tracing.install(spans)
    try:
        tracer = tracing.tracer("test")
        with tracer.start_as_current_span("gateway.offload") as sender:
            props = trace_mqtt.to_user_properties(tracing.current_trace())
        parent = tracing.context_of(trace_mqtt.from_message(props, None))
        with tracer.start_as_current_span("worker.handle", context=parent) as receiver:
            pass
        assert receiver.get_span_context().trace_id == sender.get_span_context().trace_id
        assert receiver.parent.span_id == sender.get_span_context().span_id
    finally:
        tracing.shutdown()


def _traced_sidecar(config_text: str, tmp_path) -> list[str]:
    """A real edge-proxy with `[tracing]` as given: one request with a caller's traceparent, then
    SIGTERM (which exports what is buffered); its stderr lines."""
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    config = tmp_path / "config.toml"
    config.write_text(f'[proxy]\nport = 0\nengine_socket = "{tmp_path}/engine.sock"\n\n[tracing]\nenabled = true\n{config_text}')
    proc = subprocess.Popen([sys.executable, "-m", "proxy.main", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if '"msg": "listening"' in line:
                url = json.loads(line)["url"]
                break
        request = urllib.request.Request(f"{url}/healthz", headers={"traceparent": TP})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        lines += proc.communicate(timeout=30)[1].splitlines(keepends=True)
    assert proc.returncode == 0, "".join(lines)
    return lines


def _spans(lines: list[str]) -> list[dict]:
    import json

    return [span for span in (json.loads(line) for line in lines if line.startswith("{")) if "context" in span]


def test_the_console_exporter_writes_each_span_as_a_json_line_on_stderr(tmp_path):
    lines = _traced_sidecar('exporter = "console"\n', tmp_path)
    (span,) = _spans(lines)
    assert span["name"] == "GET /healthz" and span["kind"] == "SpanKind.SERVER"
    assert span["context"]["trace_id"] == "0x" + TP.split("-")[1]  # the caller's trace, continued
    assert span["parent_id"] == "0x" + TP.split("-")[2]
    assert span["resource"]["attributes"]["service.name"] == "edge-proxy"


def test_the_file_exporter_appends_json_lines_to_its_file(tmp_path):
    path = tmp_path / "spans.jsonl"
    lines = _traced_sidecar(f'exporter = "file"\npath = "{path}"\n', tmp_path)
    assert _spans(lines) == []  # not on stderr
    _traced_sidecar(f'exporter = "file"\npath = "{path}"\n', tmp_path)  # a second run appends
    spans = _spans(path.read_text().splitlines())
    assert [s["name"] for s in spans] == ["GET /healthz", "GET /healthz"]
    assert len(path.read_text().splitlines()) == 2


def test_the_exporter_keys_are_checked(tmp_path):
    path = tmp_path / "config.toml"
    for text, message in (('exporter = "file"', 'path: exporter = "file" needs the file'),
                          ('exporter = "jaeger"', "exporter: must be one of")):
        path.write_text(f"[tracing]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            tracing.load_tracing_config(path)
    path.write_text(f'[tracing]\nexporter = "file"\npath = "{tmp_path}/no/such/dir/spans.jsonl"\nenabled = true\n')
    with pytest.raises(ConfigError, match="path: cannot open"):
        tracing.setup(tracing.load_tracing_config(path), "edge-proxy")
