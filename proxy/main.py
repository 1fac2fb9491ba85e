"""`edge-proxy`: run the sidecar (`edge-proxy [--config FILE] [--host H] [--port P]
[--engine-socket PATH] [--mqtt URL] [--gateway-id ID] [--role gateway|cloud] [--upstream URL]`),
or hash an API key for the config (`edge-proxy hash-key`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import logging
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import web

from edge_runtime import tracing
from edge_runtime.logs import setup_logging
from edge_runtime.sd_notify import notify, watchdog_interval_s
from edge_wire.settings import ConfigError, read_config_file

from . import features
from .auth.keys import hash_key
from .broker_settings import GATEWAY, ROLES, MqttSettings, load_settings
from .config import API_KEYS_ENV, ProxyConfig, proxy_config_from
from .http.app import SIDECAR, Sidecar, build_app, make_runner

log = logging.getLogger("proxy.main")

# The flags that set a config key: a pushed value of that key is not in force while one is given.
_FLAG_KEYS = {"host": ("proxy.host", "--host"), "port": ("proxy.port", "--port"),
              "engine_socket": ("proxy.engine_socket", "--engine-socket"), "mqtt": ("mqtt.url", "--mqtt"),
              "gateway_id": ("fleet.gateway_id", "--gateway-id"), "upstream": ("cloud.upstream", "--upstream")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-proxy", description="The edge-runtime sidecar: an OpenAI-compatible HTTP API in front of the engine daemon.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file ([proxy] table; default /etc/edge-runtime/config.toml if present)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080)")
    parser.add_argument("--engine-socket", dest="engine_socket", help="the engine daemon's Unix socket")
    parser.add_argument("--mqtt", metavar="URL", help="MQTT broker, mqtt://host[:port] or mqtts://host[:port] "
                        "([mqtt] url): offload to the cloud and serve IoT devices")
    parser.add_argument("--gateway-id", dest="gateway_id", metavar="ID", help="this gateway's id in the topic tree "
                        "([fleet] gateway_id; default the host name)")
    parser.add_argument("--role", choices=ROLES, default=GATEWAY, help="gateway (default), or cloud: a cloud worker serving "
                        "offloaded requests from the broker's shared subscription")
    parser.add_argument("--upstream", metavar="URL", help="role cloud: forward to this OpenAI-compatible base URL "
                        "([cloud] upstream, e.g. http://host:8000/v1) instead of the engine")
    sub = parser.add_subparsers(dest="command")
    h = sub.add_parser("hash-key", help=f"print the sha256 digest of an API key, for [proxy] api_keys ({API_KEYS_ENV} takes plain keys)")
    h.add_argument("--generate", action="store_true", help="make a new random key; print it and its digest")
    return parser


def _hash_key(args: argparse.Namespace) -> int:
    if args.generate:
        key = "sk-edge-" + secrets.token_urlsafe(24)
        print(f"key:    {key}\nsha256: {hash_key(key)}")
        return 0
    # Read from stdin, never from argv: command lines end up in shell history and `ps`.
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("edge-proxy: error: empty key", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


async def serve(config: ProxyConfig, mqtt: MqttSettings | None = None) -> None:
    """Listen until SIGTERM/SIGINT, then let requests in flight finish (up to grace_s)."""
    app = build_app(config)
    services = None
    if mqtt is not None and mqtt.mqtt is not None:
        from .broker import attach  # (its code loads only with a broker)

        services = attach(app, mqtt)  # the broker side: fleet agent, offload, device front, cloud worker
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc})") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app[SIDECAR])
    host, port = runner.addresses[0][:2]  # the bound port, when port 0 asked for any
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    notify("READY=1", f"STATUS=serving on {url}")
    log.info("listening", extra={"url": url, "engine_socket": str(config.resolved_engine_socket()),
                                 "api_keys": len(config.api_keys), "cache": config.cache_enabled})
    interval = watchdog_interval_s()
    watchdog = asyncio.create_task(_watchdog(interval)) if interval else None
    await stop.wait()
    notify("STOPPING=1")
    log.info("shutting down", extra={"grace_s": config.grace_s})
    if watchdog is not None:
        watchdog.cancel()
    if services is not None:  # the broker first: a successor with the same client id may connect meanwhile
        await services.leave()
    await runner.cleanup()
    log.info("stopped")


def _reload(sidecar: Sidecar) -> None:
    """SIGHUP: the files read at start are read again now (JWT keys, the safety policy)."""
    sidecar.auth.reload()
    sidecar.safety.reload()


async def _watchdog(interval_s: float) -> None:
    """The pings come from the event loop itself: a blocked loop stops them."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def load(args: argparse.Namespace) -> tuple[ProxyConfig, MqttSettings]:
    """The sidecar's config and its MQTT side's: the file, with the config a controller pushed
    laid over it (fleet sync), and the command line's flags over both."""
    data, path = read_config_file(args.config)
    cli = {"mqtt_url": args.mqtt, "gateway_id": args.gateway_id, "role": args.role, "upstream": args.upstream}
    mqtt = load_settings(data, path, **cli)
    if mqtt.fleet.enabled and mqtt.role == GATEWAY:
        from .fleet import applied_config, overlay  # (the fleet's code loads only when it is on)

        data = overlay(data, applied_config(mqtt.fleet))  # what the controller pushed stays in force
        mqtt = load_settings(data, path, **cli)
    config = proxy_config_from(data, path).with_overrides(host=args.host, port=args.port, engine_socket=args.engine_socket)
    given = {key: flag for attr, (key, flag) in _FLAG_KEYS.items() if getattr(args, attr) is not None}
    return config, dataclasses.replace(mqtt, command_line=given)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        return _hash_key(args)
    try:
        config, mqtt = load(args)
        tracing_config = tracing.load_tracing_config(args.config)
        setup_logging(config.log_level)
        log.info("features", extra=features.summary(mqtt, tracing_config))  # what is on, and why
        tracing.setup(tracing_config, "edge-proxy")
        try:
            asyncio.run(serve(config, mqtt))
        finally:
            tracing.shutdown()  # exports the spans still buffered
    except ConfigError as exc:  # a KeyFileError among them
        print(f"edge-proxy: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the fleet state directory cannot be written
        print(f"edge-proxy: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
