"""`edgectl serve`: the console's aiohttp application (pages, static assets, JSON API) over a
FleetListener, and running it (HTTP on loopback, HTTPS elsewhere: config.py says why)."""

from __future__ import annotations

import asyncio
import signal
import ssl
from importlib import resources
from pathlib import Path

from aiohttp import web

from proxy.fleet.schema import default_tables
from proxy.fleet.signing import load_private_key, public_key_text
from proxy.mqtt import MqttConfig

from . import api
from .auth import Access, middleware
from .config import ConsoleConfig
from .fleet_listener import FleetListener
from .store import HistoryStore

STATIC = Path(str(resources.files("edgectl.console") / "static"))
_PAGES = {"/": "index.html", "/gateway/{id}": "gateway.html"}


def build_app(config: ConsoleConfig, mqtt: MqttConfig, prefix: str = "edge") -> web.Application:
    key = load_private_key(Path(config.key_file)) if config.key_file else None
    store = HistoryStore(config.db_path, max_age_s=config.history_max_age_s, max_bytes=config.history_max_bytes)
    listener = FleetListener(mqtt, prefix, store, key)
    access = Access(config)
    app = web.Application(middlewares=[middleware(access)], client_max_size=api.MAX_BODY_BYTES)
    app[api.LISTENER], app[api.ACCESS], app[api.CONFIG] = listener, access, config
    app[api.TABLES] = default_tables(None)  # the gateways' own rules, at their defaults
    app[api.FINGERPRINT] = public_key_text(key.public_key()) if key is not None else ""
    for path, name in _PAGES.items():
        app.router.add_get(path, _page(name))
    app.router.add_static("/static/", STATIC, append_version=False)
    api.add_routes(app)

    async def lifecycle(app: web.Application):
        await listener.start()
        yield
        await listener.stop()
        store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def _page(name: str):
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return handler


def tls_context(config: ConsoleConfig) -> ssl.SSLContext | None:
    if not (config.tls_cert and config.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


async def serve(config: ConsoleConfig, mqtt: MqttConfig, prefix: str = "edge") -> None:
    """Run until SIGTERM or SIGINT; prints the URL once listening (tests and scripts read it)."""
    app = build_app(config, mqtt, prefix)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = tls_context(config)
    site = web.TCPSite(runner, config.host, config.port, ssl_context=context)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if context else "http"
    shown = f"[{host}]" if ":" in host else host
    mode = "read-only (no --key)" if app[api.LISTENER].key is None else f"pushes signed by key {app[api.FINGERPRINT]}"
    print(f"edgectl console on {scheme}://{shown}:{port}/ ({mode})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
