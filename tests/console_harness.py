"""The fleet console's test rig: real sidecars with fleet on (`python -m proxy.main`, no engine),
`edgectl serve` as its own process, and Debian's chromium driven by Playwright (never
`playwright install`: the browser is the system's)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in (os.environ.get("EDGE_TEST_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and os.access(p, os.X_OK)), None)
KEEPALIVE_S = 2  # the gateways' MQTT keepalive: the broker speaks a Last Will within 1.5x this
TELEMETRY_S = 0.5
START_TIMEOUT_S = 30.0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_OFFLOAD_SECRET": "x" * 64}


def start_sidecar(directory: Path, broker_url: str, gateway_id: str, groups: list[str], public_key: Path) -> subprocess.Popen:
    """A real sidecar (HTTP front, fleet agent) with no engine behind it, in its own process group."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.toml"
    config.write_text(f"""[proxy]
port = 0
engine_socket = "{directory / 'no-engine.sock'}"
[mqtt]
url = "{broker_url}"
keepalive_s = {KEEPALIVE_S}
reconnect_min_s = 0.1
reconnect_max_s = 0.5
[fleet]
enabled = true
gateway_id = "{gateway_id}"
groups = {json.dumps(groups)}
state_dir = "{directory / 'state'}"
telemetry_period_s = {TELEMETRY_S}
controller_public_key = "{public_key}"
""")
    with open(directory / "sidecar.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "proxy.main", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                env=_env(), start_new_session=True)


class ConsoleProcess:
    """`edgectl serve` on a free port; `url` once it says where it listens."""

    def __init__(self, log_path: Path, broker_url: str, *args: str, config: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "edgectl", "--broker", broker_url]
        if config is not None:
            cmd += ["--config", str(config)]
        self.log_path = log_path
        self.proc = subprocess.Popen([*cmd, "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=open(log_path, "ab"),
                                     env=_env(), text=True, start_new_session=True)
        line = self.proc.stdout.readline()  # "edgectl console on http://127.0.0.1:PORT/ (...)"
        if "console on " not in line:
            self.stop()
            raise RuntimeError(f"edgectl serve did not start: {line!r} {log_path.read_text()[-2000:]}")
        self.url = line.split("console on ", 1)[1].split(" ", 1)[0].rstrip("/")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(START_TIMEOUT_S)
        self.proc.stdout.close()


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: no goodbye, the broker speaks the Last Will."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(START_TIMEOUT_S)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill(proc)


def is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or url.startswith(("data:", "about:"))
