"""Fleet sync's parts without a broker: the [fleet] table, desired documents and their checks,
signatures, the telemetry buffer and sources, and the crash-safe writer (killed mid-write)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

from edge_wire.settings import ConfigError
from proxy.config import ProxyConfig
from engine_harness import Engine
from proxy.fleet import EngineStatus, default_tables, load_fleet_config, managed, overlay
from proxy.fleet.buffer import TelemetryBuffer
from proxy.fleet.config import FleetConfig
from proxy.fleet.document import DocumentError, make_desired, parse_desired
from proxy.fleet.schema import changes, fleet_table, validate
from proxy.fleet.signing import generate_keypair, load_private_key, load_public_key, sign, verify
from proxy.fleet.telemetry import Collector
from proxy.fleet.tegrastats import parse as parse_tegrastats


def test_fleet_config_names_the_key_at_fault(tmp_path):
    path = tmp_path / "config.toml"
    for text, message in [
        ('gateway_id = "gw/1"', r"\[fleet\] gateway_id: must be 1 to 64 of"),
        ('gateway_id = "group"', r"gateway_id: 'group' is reserved"),
        ('groups = ["a", "a"]', r"groups: lists a name twice"),
        ('groups = ["ok", "bad name"]', r"groups\[1\]: must be 1 to 64"),
        ('topic_prefix = "edge/#"', r"topic_prefix: must be levels of"),
        ("telemetry_period_s = 0.01", r"telemetry_period_s: must be 0 \(off\) or >= 0.1"),
        ("enabled = true", r"controller_public_key: required for fleet sync .* or set allow_unsigned = true"),
        ("telemetry_buffer_bytes = 10", r"telemetry_buffer_bytes: must be in \[4096, "),
        ("colour = 1", r"\[fleet\] unknown key 'colour'"),
    ]:
        path.write_text(f"[fleet]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_fleet_config(path)
    path.write_text('[fleet]\ngateway_id = "gw-1"\ncontroller_public_key = "/k.pub"\n')
    config = load_fleet_config(path)
    assert not config.allow_unsigned and config.resolved_gateway_id() == "gw-1"
    assert FleetConfig(gateway_id="x", state_dir=str(tmp_path)).resolved_state_dir() == tmp_path


def test_desired_document_shape():
    doc = make_desired("gw-1", 3, {"proxy": {"port": 8081}})
    assert parse_desired(json.dumps(doc).encode(), "gw-1") == doc
    assert parse_desired(msgpack.packb(doc), "gw-1") == doc  # msgpack works too
    with pytest.raises(DocumentError) as info:
        parse_desired(json.dumps({**doc, "version": 0, "extra": 1, "config": {"proxy": 5}}).encode(), "gw-2")
    assert set(info.value.reasons) == {"version", "target", "config", "extra"}
    with pytest.raises(DocumentError, match="not JSON or msgpack"):
        parse_desired(b"{not json", "gw-1")
    with pytest.raises(DocumentError, match="over the limit"):
        parse_desired(b"{" + b" " * (300 << 10) + b"}", "gw-1")


def test_signatures(tmp_path):
    generate_keypair(tmp_path / "c.key", tmp_path / "c.pub")
    assert oct(os.stat(tmp_path / "c.key").st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "c.key", tmp_path / "other.pub")  # never overwrites a key
    key, public = load_private_key(tmp_path / "c.key"), load_public_key(tmp_path / "c.pub")
    doc = sign(make_desired("gw-1", 1, {"proxy": {"cache_ttl_s": 5.5, "model_aliases": ["ü"]}}), key)
    assert verify(doc, public) is None
    assert verify(json.loads(json.dumps(doc, indent=3)), public) is None  # layout does not matter
    assert "does not verify" in verify({**doc, "version": 2}, public)
    assert "missing" in verify({k: v for k, v in doc.items() if k != "signature"}, public)
    assert verify({**doc, "signature": "%%%"}, public) == "not base64"


def tables():
    return {"proxy": managed(ProxyConfig()), "fleet": fleet_table(FleetConfig(gateway_id="gw-1"))}


def test_validation_gives_a_reason_per_key():
    reasons = validate({
        "proxy": {"port": 70000, "rate_limit_requests_per_min": "fast", "colour": 1, "cache_ttl_s": 60},
        "fleet": {"gateway_id": "other", "telemetry_period_s": 5},
        "mqtt": {"url": "mqtt://evil"},
        "nosuch": {},
    }, tables())
    assert reasons == {
        "proxy.port": "must be in [0, 65535], got 70000",
        "proxy.rate_limit_requests_per_min": "must be a number, got 'fast'",
        "proxy.colour": "unknown key",
        "fleet.gateway_id": "the gateway's identity is set locally",
        "mqtt": "broker settings are set locally (a wrong push would cut the gateway off)",
        "nosuch": "unknown table (managed: fleet, proxy)",
    }
    # keys fine alone but not together: listening beyond loopback needs API keys
    assert validate({"proxy": {"host": "0.0.0.0"}}, tables()) == {"proxy": "api_keys: required when listening on 0.0.0.0 (not loopback); set [proxy] api_keys (edge-proxy hash-key) or EDGE_PROXY_API_KEYS"}
    assert validate({"proxy": {"host": "0.0.0.0", "api_keys": ["a" * 64]}}, tables()) == {}


def test_unsigned_documents_cannot_set_signed_only_keys(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[fleet]\ngateway_id = "gw-9"\n')
    t = default_tables(path)
    pushed = {"proxy": {"api_keys": ["a" * 64], "cache_ttl_s": 5},
              "offload": {"max_memory_percent": 1, "idle_timeout_s": 5},
              "devices": {"enabled": True, "max_concurrent": 4}}
    assert validate(pushed, t, signed=False) == {
        "proxy.api_keys": "decides who may call the gateway: settable only in a document signed by the controller",
        "offload.max_memory_percent": "decides when prompts leave the gateway (offload): settable only in a document signed by the controller",
        "devices.enabled": "decides who may call the gateway: settable only in a document signed by the controller",
    }
    assert validate(pushed, t, signed=True) == {}
    # a table guarded by name: a key not listed (e.g. one added later) needs a signature
    guarded = {"proxy": managed(ProxyConfig(), unsigned=frozenset({"port"}))}
    assert validate({"proxy": {"port": 1, "cache_ttl_s": 5}}, guarded, signed=False) == {
        "proxy.cache_ttl_s": "not among the keys an unsigned document may set: settable only in a document signed by the controller"}


def test_changes_fall_back_to_the_running_values():
    t = tables()
    old = {"proxy": {"port": 9000, "cache_ttl_s": 60}}
    new = {"proxy": {"cache_ttl_s": 60, "model_aliases": ["gpt-4o-mini"]}, "fleet": {"telemetry_period_s": 2}}
    assert changes(old, new, t) == {"fleet.telemetry_period_s": 2, "proxy.model_aliases": ["gpt-4o-mini"], "proxy.port": 8080}
    assert changes(new, new, t) == {}
    assert changes({"proxy": {"model_aliases": ()}}, {"proxy": {"model_aliases": []}}, t) == {}  # tuple == list
    assert overlay({"proxy": {"host": "::1", "port": 1}}, {"proxy": {"port": 2}, "fleet": {"groups": []}}) == {
        "proxy": {"host": "::1", "port": 2}, "fleet": {"groups": []}}


def test_default_tables_load_the_running_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[proxy]\nport = 9001\n[engine]\nmax_batch = 2\n[fleet]\ngateway_id = "gw-9"\n')
    t = default_tables(path)
    assert (t["proxy"].running["port"], t["fleet"].running["gateway_id"]) == (9001, "gw-9")
    assert "gateway_id" in t["fleet"].locked
    assert validate({"engine": {"max_batch": 8}}, t) == {"engine": "set locally (the engine does not read pushed config)"}


def test_buffer_is_bounded_ordered_and_survives_reopening(tmp_path):
    path = tmp_path / "t.sqlite3"
    buffer = TelemetryBuffer(path, max_bytes=100)
    for i in range(12):
        buffer.append(bytes([i]) * 10)  # 120 bytes offered: the two oldest go
    assert (len(buffer), buffer.bytes, buffer.dropped) == (10, 100, 2)
    rows = buffer.peek(3)
    assert [payload[0] for _, payload in rows] == [2, 3, 4]
    buffer.remove_through(rows[-1][0])
    buffer.close()
    buffer = TelemetryBuffer(path, max_bytes=100)
    assert (len(buffer), buffer.dropped) == (7, 2)
    assert [payload[0] for _, payload in buffer.peek(100)] == list(range(5, 12))
    buffer.append(b"x" * 500)  # larger than the bound alone: kept (the newest), the rest dropped
    assert (len(buffer), buffer.dropped) == (1, 9)
    buffer.close()


def test_collector_reports_host_engine_and_sidecar_figures():
    async def engine_status():
        return {"type": "status", "queue_depth": 2, "running": 1, "tokens_per_s": 31.5}

    async def main():
        collector = Collector(disk_paths=("/", "/no/such/dir"), engine_status=engine_status,
                              counters=lambda: {"requests": 7, "offload": {"queue_full": 1}})
        return await collector.sample()

    sample = asyncio.run(main())
    host = sample["host"]
    assert 0 <= host["cpu_percent"] <= 100 and host["mem_total"] > 0 and host["disks"]["/"]["total"] > 0
    assert "error" in host["disks"]["/no/such/dir"]
    assert sample["process"]["rss"] > 0
    assert sample["engine"] == {"up": True, "queue_depth": 2, "running": 1, "tokens_per_s": 31.5}
    assert sample["proxy"] == {"requests": 7, "offload": {"queue_full": 1}}
    msgpack.packb(sample)  # what goes on the wire


@pytest.mark.parametrize("line, expected", [
    ("RAM 2448/3964MB (lfb 4x2MB) SWAP 0/1982MB (cached 0MB) CPU [3%@1479,2%@1479,off,0%@1479] EMC_FREQ 0% GR3D_FREQ 12% "
     "PLL@24C CPU@26C PMIC@100C GPU@25.5C AO@33C thermal@25.75C POM_5V_IN 2310/2310 POM_5V_GPU 0/0 POM_5V_CPU 413/413",
     {"ram_used_mb": 2448, "ram_total_mb": 3964, "swap_used_mb": 0, "swap_total_mb": 1982, "cpu_percent": [3, 2, None, 0],
      "emc_percent": 0, "gpu_percent": 12, "temps_c": {"PLL": 24.0, "CPU": 26.0, "PMIC": 100.0, "GPU": 25.5, "AO": 33.0, "thermal": 25.75},
      "power_mw": {"POM_5V_IN": 2310, "POM_5V_GPU": 0, "POM_5V_CPU": 413}}),
    ("11-27-2024 10:00:00 RAM 2103/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729] GR3D_FREQ 0%@[305,305] "
     "cpu@47.5C soc2@45.406C gpu@46.5C tj@47.5C VDD_IN 4011mW/4011mW VDD_CPU_GPU_CV 480mW/480mW VDD_SOC 1280mW/1280mW",
     {"ram_used_mb": 2103, "ram_total_mb": 7620, "swap_used_mb": 0, "swap_total_mb": 3810, "cpu_percent": [1, 0], "gpu_percent": 0,
      "temps_c": {"cpu": 47.5, "soc2": 45.406, "gpu": 46.5, "tj": 47.5},
      "power_mw": {"VDD_IN": 4011, "VDD_CPU_GPU_CV": 480, "VDD_SOC": 1280}}),
])
def test_tegrastats_lines(line, expected):
    assert parse_tegrastats(line) == expected


_WRITER = """
import sys
from pathlib import Path
from proxy.fleet.atomic import write_json
path = Path(sys.argv[1])
i = 0
while True:  # alternate a big and a small document, so that a kill lands in the middle of a write
    i += 1
    write_json(path, {"n": i, "pad": "x" * (2_000_000 if i % 2 else 10)})
    if i == 2:
        print("ready", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_a_readable_file(tmp_path):
    path = tmp_path / "config-state.json"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, cwd=os.getcwd())
        try:
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(0.05 + 0.07 * attempt)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        doc = json.loads(path.read_bytes())  # whole: the old document or the new one
        assert doc["n"] >= 2 and len(doc["pad"]) == (2_000_000 if doc["n"] % 2 else 10)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["config-state.json"], [".config-state.json.tmp", "config-state.json"])


def test_engine_status_from_a_real_engine(tiny_model_dir):
    async def sample(source):
        return (await Collector(engine_status=source).sample())["engine"]

    with tempfile.TemporaryDirectory(prefix="fl-", dir="/tmp") as d:  # a short socket path
        socket_path = Path(d) / "e.sock"
        with Engine(tiny_model_dir, socket_path):
            engine = asyncio.run(sample(EngineStatus(socket_path)))
        assert engine["up"] and engine["queue_depth"] == 0 and engine["running"] == 0 and "tokens_per_s" in engine
        assert engine["kv"]["slots"] == 2 and "type" not in engine
        assert asyncio.run(sample(EngineStatus(socket_path))) == {"up": False}  # gone


@pytest.mark.gpu
def test_nvml_reports_the_gpus():
    from proxy.fleet.nvml import Nvml

    nvml = Nvml.open()
    assert nvml is not None, "NVML is unavailable (pip install nvidia-ml-py)"
    gpus = nvml.sample()
    nvml.close()
    assert gpus and all(g["mem_total"] > 0 and isinstance(g["name"], str) and 0 <= g["util_percent"] <= 100 for g in gpus)
