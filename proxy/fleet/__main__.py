"""`python -m proxy.fleet`: the fleet agent alone, without the HTTP sidecar (for gateways that
only report, and for tests). Reads `[mqtt]` and `[fleet]` (and `[proxy]`/`[engine]` to check
pushed values and find the engine's socket) from the config file; runs until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from edge_runtime.logs import setup_logging
from edge_runtime.sd_notify import notify, watchdog_interval_s
from edge_wire.settings import ConfigError, read_config_file

from ..config import load_config as load_proxy_config
from ..mqtt import mqtt_config_from
from .agent import FleetAgent
from .config import fleet_config_from
from .schema import default_tables
from .signing import KeyFileError
from .telemetry import EngineStatus

log = logging.getLogger("proxy.fleet.main")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m proxy.fleet", description="Run the fleet agent (presence, telemetry, config sync) alone.")
    parser.add_argument("--config", type=Path, help="TOML config file (default /etc/edge-runtime/config.toml if present)")
    parser.add_argument("--gateway-id", help="this gateway's id (default [fleet] gateway_id, else the host name)")
    parser.add_argument("--broker", help="broker URL, mqtt://host:port or mqtts://host:port (default [mqtt] url)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


async def run(agent: FleetAgent, engine_status: EngineStatus) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    notify("READY=1", f"STATUS=fleet agent for {agent.gateway_id}")
    interval = watchdog_interval_s()
    watchdog = asyncio.create_task(_watchdog(interval)) if interval else None
    await stop.wait()
    notify("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    await agent.stop()
    await engine_status.close()


async def _watchdog(interval_s: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        data, path = read_config_file(args.config)
        fleet = fleet_config_from(data, path).with_overrides(gateway_id=args.gateway_id)
        mqtt = mqtt_config_from(data, path).with_overrides(url=args.broker)
        engine_status = EngineStatus(load_proxy_config(path).resolved_engine_socket())
        agent = FleetAgent(fleet, mqtt, tables=default_tables(path), engine_status=engine_status)
    except (ConfigError, KeyFileError) as exc:
        print(f"python -m proxy.fleet: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(agent, engine_status))
    except OSError as exc:  # the state directory cannot be written
        print(f"python -m proxy.fleet: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
