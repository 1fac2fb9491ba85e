"""The sidecar says at start what it turned on and why (one `features` log line): each feature's
state, what decided it, and the key that changes it; `--mqtt` alone connects a broker but does
not join the fleet, and the line says so."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_runtime.tracing import TracingConfig
from proxy.broker_settings import load_settings
from proxy.features import summary

SECRET = "an offload secret of thirty-two bytes or more, for tests"


def _summary(data: dict, **flags) -> dict:
    return summary(load_settings(data, None, environ={}, **flags), TracingConfig(**data.get("tracing", {})))


def test_without_a_broker_only_what_needs_none_is_on():
    out = _summary({"devices": {"enabled": True}})
    assert out["broker"] is None and out["role"] == "gateway"
    assert out["fleet"] == {"on": False, "why": "[fleet] enabled = false (set it to true, with [mqtt] url, to join the fleet)"}
    assert out["offload"] == {"on": False, "why": "no broker: set [mqtt] url or --mqtt URL"}
    assert out["devices"] == {"on": False, "why": "[devices] enabled = true, but no broker: set [mqtt] url or --mqtt URL"}
    assert out["tracing"] == {"on": False, "why": "[tracing] enabled = false"}


def test_a_broker_alone_does_not_join_the_fleet_and_says_why():
    out = _summary({}, mqtt_url="mqtt://127.0.0.1:1883")
    assert out["fleet"]["on"] is False
    assert "a broker alone (--mqtt, [mqtt] url) does not join the fleet; set [fleet] enabled = true" in out["fleet"]["why"]
    assert out["offload"] == {"on": False, "why": "no offload secret: set [offload] secret_file or $EDGE_OFFLOAD_SECRET "
                                                  "(the same on gateways and workers)"}


def test_each_feature_on_names_the_key_that_turned_it_on():
    data = {"mqtt": {"url": "mqtt://127.0.0.1:1883"}, "fleet": {"enabled": True, "gateway_id": "gw-7", "allow_unsigned": True},
            "offload": {"secret": SECRET}, "devices": {"enabled": True},
            "tracing": {"enabled": True, "exporter": "console"}}
    out = _summary(data)
    assert out["fleet"] == {"on": True, "why": "[fleet] enabled = true: gateway gw-7 on mqtt://127.0.0.1:1883"}
    assert out["offload"]["on"] and "[offload] enabled = true, with the fleet's offload secret" in out["offload"]["why"]
    assert SECRET not in json.dumps(out)  # secrets are never logged
    assert out["devices"] == {"on": True, "why": "[devices] enabled = true, on mqtt://127.0.0.1:1883"}
    assert out["tracing"] == {"on": True, "why": "[tracing] enabled = true: exporter console (stderr)"}
    assert _summary({**data, "offload": {"enabled": False}})["offload"] == {"on": False, "why": "[offload] enabled = false"}


def test_a_cloud_worker_says_where_it_forwards():
    out = _summary({"offload": {"secret": SECRET}}, role="cloud", mqtt_url="mqtt://127.0.0.1:1883",
                   upstream="http://127.0.0.1:8000/v1")
    assert out["cloud_worker"] == {"on": True, "why": "--role cloud: forwards to http://127.0.0.1:8000/v1 ([cloud] upstream)"}
    assert not out["fleet"]["on"] and not out["offload"]["on"] and not out["devices"]["on"]


def test_edge_proxy_logs_the_features_line_first(mosquitto):
    """The real process, with `--mqtt` and nothing else: its first log line says the fleet is off, and why."""
    with tempfile.TemporaryDirectory(prefix="ef-", dir="/tmp") as d:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.main", "--port", "0", "--mqtt", mosquitto.url,
                                 "--engine-socket", str(Path(d) / "engine.sock")], stderr=subprocess.PIPE, text=True)
        try:
            first = json.loads(proc.stderr.readline())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    assert first["msg"] == "features" and first["broker"] == mosquitto.url
    assert first["fleet"]["on"] is False and "does not join the fleet" in first["fleet"]["why"]
