"""`edge-proxy`: run the sidecar (`edge-proxy [--config FILE] [--host H] [--port P]
[--engine-socket PATH]`), or hash an API key for the config (`edge-proxy hash-key`)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import web

from edge_runtime.logs import setup_logging
from edge_runtime.sd_notify import notify, watchdog_interval_s

from .app import build_app, make_runner
from .auth import hash_key
from .config import API_KEYS_ENV, ConfigError, ProxyConfig, load_config

log = logging.getLogger("proxy.main")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-proxy", description="The edge-runtime sidecar: an OpenAI-compatible HTTP API in front of the engine daemon.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file ([proxy] table; default /etc/edge-runtime/config.toml if present)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080)")
    parser.add_argument("--engine-socket", dest="engine_socket", help="the engine daemon's Unix socket")
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


async def serve(config: ProxyConfig) -> None:
    """Listen until SIGTERM/SIGINT, then let requests in flight finish (up to grace_s)."""
    runner = make_runner(build_app(config), config)
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
    await runner.cleanup()
    log.info("stopped")


async def _watchdog(interval_s: float) -> None:
    """The pings come from the event loop itself: a blocked loop stops them."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        return _hash_key(args)
    try:
        config = load_config(args.config).with_overrides(host=args.host, port=args.port, engine_socket=args.engine_socket)
        setup_logging(config.log_level)
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"edge-proxy: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
