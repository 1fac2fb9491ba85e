"""The files in systemd/: the units pass `systemd-analyze verify`, say what the design needs
(notify, watchdog, restart, ordering that keeps the sidecar up, GPU nodes for the engine only),
and the example config names every key of every table with a valid value."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from edge_runtime.config import EngineConfig, load_config as load_engine_config
from proxy.config import ProxyConfig, load_config as load_proxy_config
from proxy.fleet import FleetConfig, load_fleet_config
from proxy.mqtt import MqttConfig, load_mqtt_config
from proxy.offload.config import (
    CloudConfig, DevicesConfig, OffloadConfig, cloud_config_from, devices_config_from, offload_config_from,
)

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("edge-runtime.service", "edge-proxy.service")


def unit(name: str) -> dict[str, list[str]]:
    """[Section] -> "Key=value" lines (units repeat keys, so no ConfigParser)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif line and not line.startswith("#"):
            sections.setdefault(current, []).append(line)
    return sections


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify wants the ExecStart programs to exist: point them at this environment's scripts.
    bin_dir = Path(sys.executable).parent
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        program = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
        assert (bin_dir / program).exists(), f"{program} is not installed in {bin_dir}"
        (tmp_path / name).write_text(re.sub(r"^ExecStart=(\S+)", lambda m: f"ExecStart={bin_dir / m.group(1)}", text, flags=re.M))
    result = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in UNITS)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in UNITS)]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_units_say_what_the_design_needs():
    engine, proxy = unit("edge-runtime.service"), unit("edge-proxy.service")
    for service in (engine["Service"], proxy["Service"]):
        for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure", "ProtectSystem=strict",
                     "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=",
                     "EnvironmentFile=-/etc/edge-runtime/environment"):
            assert line in service
    assert "ExecStart=edge-runtime serve --config /etc/edge-runtime/config.toml" in engine["Service"]
    assert "ExecStart=edge-proxy --config /etc/edge-runtime/config.toml" in proxy["Service"]
    assert {"User=edge-runtime", "RuntimeDirectory=edge-runtime", "RuntimeDirectoryPreserve=restart",
            "RestrictAddressFamilies=AF_UNIX"} <= set(engine["Service"])
    assert {"RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SupplementaryGroups=edge-runtime",
            "MemoryDenyWriteExecute=yes", "PrivateDevices=yes"} <= set(proxy["Service"])
    assert "MemoryDenyWriteExecute=yes" not in engine["Service"]  # ONNX Runtime / TensorRT JIT
    assert any(line.startswith("DeviceAllow=char-nvidia") for line in engine["Service"])
    assert any("nvhost" in line for line in engine["Service"]) and "DeviceAllow=/dev/nvmap rw" in engine["Service"]
    assert not any(line.startswith("DeviceAllow") for line in proxy["Service"])
    # the sidecar wants the engine but does not go down with it
    assert "Wants=network-online.target edge-runtime.service" in proxy["Unit"]
    assert "After=network-online.target edge-runtime.service" in proxy["Unit"]
    assert not any(line.startswith(("Requires=", "BindsTo=", "PartOf=")) for line in proxy["Unit"])


def test_example_config_lists_every_key_with_valid_values(tmp_path):
    text = (SYSTEMD / "config.toml").read_text()
    uncommented = "\n".join(re.sub(r"^# (\[\w+\]|\w+ = .*)$", r"\1", line) for line in text.splitlines())
    path = tmp_path / "config.toml"
    path.write_text(uncommented)
    load_engine_config(path)  # every example value is valid (the loaders raise otherwise)
    load_proxy_config(path, environ={})
    load_mqtt_config(path, environ={})
    load_fleet_config(path)
    data = tomllib.loads(uncommented)
    offload_config_from(data, path), devices_config_from(data, path), cloud_config_from(data, path, environ={})
    tables = {"engine": EngineConfig, "proxy": ProxyConfig, "mqtt": MqttConfig, "fleet": FleetConfig,
              "offload": OffloadConfig, "devices": DevicesConfig, "cloud": CloudConfig}
    for table, cls in tables.items():
        body = re.search(rf"(?ms)^\[{table}\]\n(.*?)(?=^\[|\Z)", uncommented).group(1)
        listed = set(re.findall(r"^(\w+) = ", body, re.M))
        # keys whose values are tables of their own ([proxy.jwt], ...) are documented in docs/configuration.md
        keys = {f.name for f in msgspec.structs.fields(cls) if not _takes_a_table(f)}
        assert listed == keys, f"[{table}] in systemd/config.toml: missing {keys - listed}, unknown {listed - keys}"


def _takes_a_table(f: msgspec.structs.FieldInfo) -> bool:
    return f.default_factory is dict or "Config" in str(f.type)


def test_environment_file_ships_placeholders_only():
    lines = [line for line in (SYSTEMD / "environment").read_text().splitlines() if line.strip()]
    assert all(line.startswith("#") for line in lines)  # nothing set, no secret shipped
    text = "\n".join(lines)
    for name in ("EDGE_PROXY_API_KEYS", "EDGE_MQTT_USERNAME", "EDGE_MQTT_PASSWORD"):
        assert f"#{name}=" in text
