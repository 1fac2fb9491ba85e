"""`edge-runtime up`: the engine daemon and the sidecar together, each as the same child process
systemd would run (`edge-runtime serve`, `edge-proxy`), in sessions of their own so that Ctrl-C
reaches only this process, which then stops both in an orderly way. The sidecar's package adds
this subcommand to `edge-runtime` through the `edge_runtime.commands` entry point (the engine
never imports the sidecar)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from edge_runtime.config import load_config as load_engine_config
from edge_runtime.errors import EdgeRuntimeError
from edge_wire.settings import ConfigError

from .config import load_config as load_proxy_config
from .mqtt import check_name, parse_url

READY_TIMEOUT_S = 600.0  # the first start builds the default model: seconds, but allow a slow box
POLL_S = 0.2
STOP_MARGIN_S = 10.0  # past the children's grace periods, they are killed


def main(argv: list[str]) -> int:
    """`edge-runtime up [--host H] [--port P] [--model M] [--config FILE] [--mqtt URL] [--gateway-id ID]`."""
    parser = argparse.ArgumentParser(prog="edge-runtime up", description="Run the engine daemon and the sidecar "
                                     "(OpenAI-compatible HTTP API) together until Ctrl-C.")
    parser.add_argument("--host", help="address the sidecar listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port the sidecar listens on (default 8080)")
    parser.add_argument("--model", help="recipe name, built model directory, GGUF file or HF checkpoint directory")
    parser.add_argument("--config", type=Path, help="TOML config file ([engine] and [proxy] tables)")
    parser.add_argument("--mqtt", metavar="URL", help="MQTT broker (mqtt://host[:port] or mqtts://...): offload to "
                        "cloud workers and serve IoT devices")
    parser.add_argument("--gateway-id", dest="gateway_id", metavar="ID", help="this gateway's id in the MQTT topic tree")
    args = parser.parse_args(argv)
    try:
        return up(args.config, args.host, args.port, args.model, mqtt=args.mqtt, gateway_id=args.gateway_id)
    except (EdgeRuntimeError, ConfigError) as exc:
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def up(config_path: Path | None, host: str | None, port: int | None, model: str | None, *,
       mqtt: str | None = None, gateway_id: str | None = None) -> int:
    """Run both until SIGINT/SIGTERM (exit 0) or until either dies (the other is stopped; exit 1).
    `mqtt` and `gateway_id` go to the sidecar (--mqtt, --gateway-id): offload and the device front."""
    engine_config = load_engine_config(config_path)
    proxy_config = load_proxy_config(config_path).with_overrides(host=host, port=port)
    if mqtt is not None:
        parse_url(mqtt)  # a bad URL is refused here, before anything starts
    if gateway_id is not None:
        check_name("--gateway-id", gateway_id)
    if proxy_config.port == 0:
        raise EdgeRuntimeError("up needs a fixed port (--port or [proxy] port), not 0")
    socket_path = engine_config.resolved_socket_path()
    common = ["--config", str(config_path)] if config_path else []
    engine_cmd = [sys.executable, "-m", "edge_runtime.cli", "serve", *common, "--socket", str(socket_path)]
    if model:
        engine_cmd += ["--model", model]
    proxy_cmd = [sys.executable, "-m", "proxy.main", *common, "--host", proxy_config.host,
                 "--port", str(proxy_config.port), "--engine-socket", str(socket_path)]
    proxy_cmd += ["--mqtt", mqtt] if mqtt else []
    proxy_cmd += ["--gateway-id", gateway_id] if gateway_id else []
    base = f"http://{_local_host(proxy_config.host)}:{proxy_config.port}"
    stop_timeout = max(engine_config.grace_s, proxy_config.grace_s) + STOP_MARGIN_S

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: dict[str, subprocess.Popen] = {}
    try:
        children["engine"] = subprocess.Popen(engine_cmd, start_new_session=True)
        children["sidecar"] = subprocess.Popen(proxy_cmd, start_new_session=True)
        ready = _wait_ready(base, children, stop)
        if ready is not None:
            _announce(base, ready.get("model", "default"), bool(proxy_config.api_keys))
            while not stop.wait(POLL_S) and _dead(children) is None:
                pass
        failed = _dead(children)
        if failed is not None:
            name, code = failed
            print(f"edge-runtime: error: the {name} exited with status {code} (its log is above); stopping", file=sys.stderr)
            return 1
        return 0 if _stop(children, stop_timeout) else 1
    finally:
        _stop(children, stop_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_ready(base: str, children: dict[str, subprocess.Popen], stop: threading.Event) -> dict | None:
    """/readyz's answer once it is 200; None if stopped or a child died first."""
    end = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set() and _dead(children) is None:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                return json.loads(answer.read())
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > end:
            raise EdgeRuntimeError(f"not ready after {READY_TIMEOUT_S:g} s ({base}/readyz)")
        stop.wait(POLL_S)
    return None


def _announce(base: str, model: str, keyed: bool) -> None:
    auth = ' -H "Authorization: Bearer $EDGE_API_KEY"' if keyed else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    print(f"edge-runtime: serving {model} at {base}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'", flush=True)


def _dead(children: dict[str, subprocess.Popen]) -> tuple[str, int] | None:
    for name, child in children.items():
        code = child.poll()
        if code is not None:
            return name, code
    return None


def _stop(children: dict[str, subprocess.Popen], timeout_s: float) -> bool:
    """SIGTERM to each child still running, wait for all, kill what outlives the timeout; True
    when every child exited 0."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout_s
    clean = True
    for child in children.values():
        try:
            code = child.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        clean = clean and code == 0
    return clean


def _local_host(host: str) -> str:
    """Where to reach a server listening on `host` from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
