"""The sidecar's commands as processes: `edge-proxy` as systemd runs it (READY=1 once listening,
SIGTERM exits 0), and `edge-runtime up` as a user runs it: both processes start, /readyz answers
200, a completion works, and SIGINT (Ctrl-C) stops both, with exit status 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_edge_proxy_notifies_systemd_and_stops_on_sigterm():
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="eu-", dir="/tmp") as d, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(f"{d}/notify.sock")
        notify.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": f"{d}/notify.sock", "WATCHDOG_USEC": "200000"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.main", "--port", str(port), "--engine-socket", f"{d}/no-engine.sock"],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        try:
            messages = [notify.recv(4096).decode()]
            assert "READY=1" in messages[0].split("\n")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
                assert answer.status == 200
            messages.append(notify.recv(4096).decode())
            assert messages[-1] == "WATCHDOG=1"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            while "STOPPING=1" not in messages[-1]:
                messages.append(notify.recv(4096).decode())
        finally:
            if proc.poll() is None:
                proc.kill()
            stderr = proc.communicate()[1]
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "listening" and entry["url"] == f"http://127.0.0.1:{port}" for entry in logs), stderr


def test_up_starts_both_serves_and_stops_on_sigint(tiny_model_dir):
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="eu-", dir="/tmp") as d:
        config = Path(d) / "config.toml"
        config.write_text(f'[engine]\nsocket_path = "{d}/engine.sock"\nmax_batch = 1\n\n[proxy]\nmodel_aliases = ["tiny"]\n')
        log = open(Path(d) / "stderr.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "up", "--config", str(config), "--port", str(port),
             "--model", str(tiny_model_dir)],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            banner = proc.stdout.readline()
            curl = proc.stdout.readline()
            assert f"http://127.0.0.1:{port}/v1" in banner, (banner, log.seek(0), log.read())
            log.seek(0)
            before = log.read()  # quiet start: no access-log line of up's own, no warning, before the banner
            assert '"path": "/readyz"' not in before and "unreachable" not in before and '"level": "warning"' not in before
            assert curl.strip().startswith(f"curl http://127.0.0.1:{port}/v1/chat/completions")
            children = psutil.Process(proc.pid).children()
            assert len(children) == 2
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
                assert answer.status == 200
            completion = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                               {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
            assert completion["choices"][0]["finish_reason"] in ("stop", "length")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
            gone, alive = psutil.wait_procs(children, timeout=10)
            assert not alive
            assert not (Path(d) / "engine.sock").exists()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()


def test_up_stops_the_other_when_one_dies(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="eu-", dir="/tmp") as d, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]  # the sidecar cannot listen here
        config = Path(d) / "config.toml"
        config.write_text(f'[engine]\nsocket_path = "{d}/engine.sock"\n')
        result = subprocess.run(
            [sys.executable, "-m", "edge_runtime.cli", "up", "--config", str(config), "--port", str(port),
             "--model", str(tiny_model_dir)],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert "the sidecar exited with status 2" in result.stderr and "cannot listen" in result.stderr
        assert not (Path(d) / "engine.sock").exists()  # the engine was stopped too


def _up(config: Path, log, *flags: str) -> tuple[subprocess.Popen, str]:
    """`edge-runtime up` started, and its banner once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "up", "--config", str(config), *flags],
                            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, proc.stdout.readline()


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0


def test_a_pushed_port_is_in_force_under_up_as_reported(tiny_model_dir, mosquitto, tmp_path):
    """`up` passes the sidecar only the flags the user gave: the configured port, then after a
    push and a restart the pushed one, is where it listens, and what the gateway reports."""
    from edgectl.cli import Controller
    from proxy.fleet.signing import generate_keypair, load_private_key
    from proxy.mqtt import MqttConfig

    configured, pushed = _free_port(), _free_port()
    with tempfile.TemporaryDirectory(prefix="eu-", dir="/tmp") as d:
        config = Path(d) / "config.toml"
        config.write_text(f'[engine]\nsocket_path = "{d}/engine.sock"\nmodel = "{tiny_model_dir}"\n\n'
                          f'[proxy]\nport = {configured}\n\n[mqtt]\nurl = "{mosquitto.url}"\n\n'
                          f'[fleet]\nenabled = true\ngateway_id = "gw-up"\nstate_dir = "{tmp_path}/state"\n'
                          f'controller_public_key = "{tmp_path}/ctl.pub"\ntelemetry_period_s = 0\n')
        generate_keypair(tmp_path / "ctl.key", tmp_path / "ctl.pub")  # proxy.port is a signed-only key
        async def push() -> dict:
            async with Controller(MqttConfig(url=mosquitto.url)) as ctl:
                result = await ctl.push({"proxy": {"port": pushed}}, gateway="gw-up", wait_s=30,
                                        key=load_private_key(tmp_path / "ctl.key"))
                return result.reports["gw-up"]

        async def reported(wanted) -> dict:
            """The gateway's report, once one says `wanted` (it reports again when it connects)."""
            async with Controller(MqttConfig(url=mosquitto.url)) as ctl:
                arrived = asyncio.get_running_loop().create_future()

                def on_report(message) -> None:
                    report = json.loads(message.payload)
                    if wanted(report) and not arrived.done():
                        arrived.set_result(report)

                await ctl.client.subscribe(ctl.topics.reported("gw-up"), on_report, qos=1)
                return await asyncio.wait_for(arrived, 30)

        with open(tmp_path / "stderr.log", "w+") as log:
            proc, banner = _up(config, log)
            try:
                assert f"http://127.0.0.1:{configured}/v1" in banner, (banner, log.seek(0), log.read())
                report = asyncio.run(push())
                assert report["results"] == {"proxy.port": "needs_restart"} and report["needs_restart"] == ["proxy.port"]
            finally:
                _stop(proc)
            proc, banner = _up(config, log)
            try:
                assert f"http://127.0.0.1:{pushed}/v1" in banner, (banner, log.seek(0), log.read())
                with urllib.request.urlopen(f"http://127.0.0.1:{pushed}/readyz", timeout=10) as answer:
                    assert answer.status == 200
                after = asyncio.run(reported(lambda r: r["needs_restart"] == []))
                assert after["applied"] == {"gw-up": report["version"]} and after["overridden"] == {}
            finally:
                _stop(proc)
            # A flag the user gives still wins, and the report says the pushed value is not in force.
            given = _free_port()
            proc, banner = _up(config, log, "--port", str(given))
            try:
                assert f"http://127.0.0.1:{given}/v1" in banner, (banner, log.seek(0), log.read())
                after = asyncio.run(reported(lambda r: r["overridden"]))
                assert after["overridden"] == {"proxy.port": "--port"} and after["applied"] == {"gw-up": report["version"]}
            finally:
                _stop(proc)


def test_up_reports_a_child_that_failed_while_stopping_once(capsys):
    """`up` stops its children on the way out and again in its `finally`: a child that exited
    non-zero is named once, and a second stop finds nothing left to stop."""
    from proxy.up import _stop

    children = {"engine": subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]),
                "sidecar": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])}
    children["engine"].wait()  # it failed before the stop
    assert _stop(children, 30) is False
    assert _stop(children, 30) is True and children == {}
    lines = capsys.readouterr().err.splitlines()
    assert lines.count("edge-runtime: error: the engine exited with status 3 while stopping") == 1
    assert lines.count(f"edge-runtime: error: the sidecar exited with status {-signal.SIGTERM} while stopping") == 1
    assert len(lines) == 2, lines
