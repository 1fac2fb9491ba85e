"""`edge-runtime up`: the engine daemon and the sidecar together, each as the same child process
systemd would run (`edge-runtime serve`, `edge-proxy`), in sessions of their own so that Ctrl-C
reaches only this process, which then stops both in an orderly way. The sidecar's package adds
this subcommand to `edge-runtime` through the `edge_runtime.commands` entry point (the engine
never imports the sidecar).

The children get only the flags the user gave: every other setting comes from the config file
and from what a controller pushed (proxy/main.py's `load`), so a pushed `proxy.port` is in force
after a restart, as the gateway reports it. Both follow `[engine] socket_path` of the same file.

Quiet start: `up` is the children's systemd (each gets a $NOTIFY_SOCKET of this process), so it
learns that each is ready from its READY=1, without polling the HTTP API; the sidecar starts once
the engine is ready (so it never finds the engine unreachable), then one banner is printed."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_runtime.config import load_config as load_engine_config
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.sd_notify import notify
from edge_wire.settings import ConfigError

from . import main as sidecar_main

READY_TIMEOUT_S = 600.0  # the first start builds the default model: seconds, but allow a slow box
POLL_S = 0.2
STOP_MARGIN_S = 10.0  # past the children's grace periods, they are killed
_ENGINE_FLAGS = {"config": "--config", "model": "--model"}
_SIDECAR_FLAGS = {"config": "--config", "host": "--host", "port": "--port", "mqtt": "--mqtt", "gateway_id": "--gateway-id"}


def main(argv: list[str]) -> int:
    """`edge-runtime up [--host H] [--port P] [--model M] [--config FILE] [--mqtt URL] [--gateway-id ID]`."""
    parser = argparse.ArgumentParser(prog="edge-runtime up", description="Run the engine daemon and the sidecar "
                                     "(OpenAI-compatible HTTP API) together until Ctrl-C.")
    parser.add_argument("--host", help="address the sidecar listens on (default [proxy] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port the sidecar listens on (default [proxy] port, 8080)")
    parser.add_argument("--model", help="recipe name, built model directory, GGUF file or HF checkpoint directory")
    parser.add_argument("--config", type=Path, help="TOML config file ([engine] and [proxy] tables)")
    parser.add_argument("--mqtt", metavar="URL", help="MQTT broker (mqtt://host[:port] or mqtts://...): offload to "
                        "cloud workers and serve IoT devices")
    parser.add_argument("--gateway-id", dest="gateway_id", metavar="ID", help="this gateway's id in the MQTT topic tree")
    args = parser.parse_args(argv)
    try:
        return up(args.config, _given(args, _ENGINE_FLAGS), _given(args, _SIDECAR_FLAGS))
    except (EdgeRuntimeError, ConfigError) as exc:
        print(f"edge-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The flags among `flags` that the user gave, as a command line."""
    return [part for name, flag in flags.items() if getattr(args, name) is not None for part in (flag, str(getattr(args, name)))]


def up(config_path: Path | None, engine_argv: list[str], sidecar_argv: list[str]) -> int:
    """Run both until SIGINT/SIGTERM (exit 0) or until either dies (the other is stopped; exit 1)."""
    # The sidecar's own reading of its settings (file, pushed config, flags): errors now, before
    # anything starts, and the address it will listen on.
    proxy_config, _ = sidecar_main.load(sidecar_main._parser().parse_args(sidecar_argv))
    engine_config = load_engine_config(config_path)
    if proxy_config.port == 0:
        raise EdgeRuntimeError("up needs a fixed port (--port or [proxy] port), not 0")
    base = f"http://{_local_host(proxy_config.host)}:{proxy_config.port}"
    stop_timeout = max(engine_config.grace_s, proxy_config.grace_s) + STOP_MARGIN_S

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory(prefix="edge-up-") as folder:
        try:
            engine_status = _start(children, "engine", [sys.executable, "-m", "edge_runtime.cli", "serve", *engine_argv],
                                   Path(folder), stop)
            sidecar_status = None if engine_status is None else \
                _start(children, "sidecar", [sys.executable, "-m", "proxy.main", *sidecar_argv], Path(folder), stop)
            if sidecar_status is not None:
                model = engine_status.removeprefix("serving ").rpartition(" on ")[0] or "default"
                _announce(base, model, bool(proxy_config.api_keys))
                notify("READY=1", f"STATUS=serving {model} at {base}/v1")
                while not stop.wait(POLL_S) and _dead(children) is None:
                    pass
            failed = _dead(children)
            if failed is not None:
                name, code = failed
                del children[name]  # reported here; the finally stops the other
                print(f"edge-runtime: error: the {name} exited with status {code} (its log is above); stopping", file=sys.stderr)
                return 1
            return 0 if _stop(children, stop_timeout) else 1
        finally:
            _stop(children, stop_timeout)  # those still running (an error, or a stop during the start)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _start(children: dict[str, subprocess.Popen], name: str, command: list[str], folder: Path,
           stop: threading.Event) -> str | None:
    """Start a child with a notify socket of its own and wait for its READY=1; its STATUS then
    (None if stopped, or if a child died first). STATUS lines on the way are passed on to this
    process's systemd, if any."""
    path = folder / f"{name}.notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.bind(str(path))
        sock.settimeout(POLL_S)
        children[name] = subprocess.Popen(command, start_new_session=True, env={**os.environ, "NOTIFY_SOCKET": str(path)})
        end = time.monotonic() + READY_TIMEOUT_S
        status = ""
        while not stop.is_set() and _dead(children) is None:
            try:
                lines = sock.recv(4096).decode(errors="replace").split("\n")
            except TimeoutError:
                if time.monotonic() > end:
                    raise EdgeRuntimeError(f"the {name} was not ready after {READY_TIMEOUT_S:g} s") from None
                continue
            for line in lines:
                if line.startswith("STATUS="):
                    status = line.removeprefix("STATUS=")
                    notify(f"STATUS={name}: {status}")
            if "READY=1" in lines:
                return status
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
    when every child exited 0. Each is reported once: it leaves `children` when reaped."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout_s
    clean = True
    for name, child in list(children.items()):
        try:
            code = child.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        del children[name]
        if code != 0:
            print(f"edge-runtime: error: the {name} exited with status {code} while stopping", file=sys.stderr)
        clean = clean and code == 0
    return clean


def _local_host(host: str) -> str:
    """Where to reach a server listening on `host` from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
