"""`edgectl`: the reference fleet controller. Lists gateways (presence, last telemetry, config
version), watches telemetry live, pushes a config file (TOML or JSON; signed with an Ed25519
key when given one) to a gateway or a group and shows what each gateway reported, resets a
gateway's config version (signed), and makes signing keys. `Controller` is the same thing as a
library (the tests drive fleet sync with it)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_wire.settings import ConfigError, read_config_file
from proxy.fleet.document import GROUP_PREFIX, MAX_VERSION, decode_payload, group_target, make_desired
from proxy.fleet.signing import KeyFileError, generate_keypair, load_private_key, public_key_text, sign
from proxy.mqtt import Message, MqttClient, MqttConfig, Topics, check_name, check_prefix, mqtt_config_from

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_NO_REPORT = 0, 1, 2, 3
CONNECT_TIMEOUT_S = 10.0
# A retained version further ahead of our clock than this is not followed (last + 1) by a push:
# gateways would refuse it; `reset-version` is the way back from it.
FUTURE_SLACK_MS = 60_000


class ControllerError(Exception):
    """The broker cannot be reached, or a file cannot be used."""


@dataclass
class Gateway:
    """What the broker holds about one gateway (its retained messages)."""

    id: str
    status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    reported: dict[str, Any] | None = None


@dataclass
class PushResult:
    version: int
    target: str
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # gateway -> its report on this version
    missing: list[str] = field(default_factory=list)  # expected gateways that did not report in time

    @property
    def ok(self) -> bool:
        return not self.missing and bool(self.reports) and all(r["status"] == "applied" for r in self.reports.values())


class Controller:
    def __init__(self, mqtt: MqttConfig, prefix: str = "edge", client_id: str | None = None) -> None:
        self.topics = Topics(prefix)
        self.client = MqttClient(mqtt, client_id or f"edgectl-{secrets.token_hex(6)}")
        self._barrier_topic = f"{prefix}/edgectl/{self.client.client_id}/barrier"
        self._barriers: dict[bytes, asyncio.Future[None]] = {}

    async def __aenter__(self) -> Controller:
        await self.client.start()
        if not await self.client.wait_connected(CONNECT_TIMEOUT_S):
            await self.client.stop()
            raise ControllerError(f"cannot reach the broker at {self.client.config.url}")
        await self.client.subscribe(self._barrier_topic, self._on_barrier, qos=1)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.stop()

    async def gateways(self) -> dict[str, Gateway]:
        """Every gateway with a retained status, telemetry or report, by id."""
        found: dict[str, Gateway] = {}

        def collect(kind: str):
            def on_message(message: Message) -> None:
                gw = self.topics.gateway_of(message.topic)
                if gw is not None and message.payload:
                    setattr(found.setdefault(gw, Gateway(gw)), kind, _decode(message.payload))
            return on_message

        filters = {"status": self.topics.status("+"), "telemetry": self.topics.telemetry("+"), "reported": self.topics.reported("+")}
        await self._read_retained({f: collect(kind) for kind, f in filters.items()})
        return dict(sorted(found.items()))

    async def retained(self, topic: str) -> dict[str, Any] | None:
        """The retained message on `topic`, decoded (None if there is none)."""
        holder: list[dict[str, Any]] = []
        await self._read_retained({topic: lambda m: holder.append(_decode(m.payload)) if m.payload else None})
        return holder[-1] if holder else None

    async def watch(self, gateways: list[str] | None = None, retained: bool = False) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(gateway, telemetry) as it arrives; with `retained`, the last one kept by the broker first."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        def on_message(message: Message) -> None:
            gw = self.topics.gateway_of(message.topic)
            if gw is not None and message.payload and (retained or not message.retain):
                queue.put_nowait((gw, _decode(message.payload)))

        filters = [self.topics.telemetry(gw) for gw in gateways] if gateways else [self.topics.telemetry("+")]
        for f in filters:
            await self.client.subscribe(f, on_message, qos=1)
        try:
            while True:
                yield await queue.get()
        finally:
            for f in filters:
                self.client.unsubscribe(f, on_message)

    async def push(
        self, config: dict[str, dict[str, Any]], *, gateway: str | None = None, group: str | None = None,
        version: int | None = None, key: Ed25519PrivateKey | None = None, wait_s: float = 10.0, reset: bool = False,
        issued_by: str | None = None,
    ) -> PushResult:
        """Publish a desired config (retained) for `gateway` or `group` and wait up to `wait_s`
        for the reports on it: from the gateway, or from every online member of the group.
        Without `version`: milliseconds since the epoch, or one above the retained one if higher
        (and not in the future). `reset` (signed only): taken whatever version the gateway has.
        `issued_by`: who pushes (default user@host of this process; the console names its user)."""
        if reset and key is None:
            raise ValueError("a version reset must be signed (--sign-key)")
        if gateway is not None and group is None:
            target, topic, report_filter = gateway, self.topics.desired(gateway), self.topics.reported(gateway)
        elif group is not None and gateway is None:
            target, topic, report_filter = group_target(group), self.topics.group_desired(group), self.topics.reported("+")
        else:
            raise ValueError("push to a gateway or to a group")
        reports: dict[str, dict[str, Any]] = {}
        arrived = asyncio.Event()
        pushed: list[int] = []

        def on_report(message: Message) -> None:
            report = _decode(message.payload) if message.payload else None
            gw = self.topics.gateway_of(message.topic)
            if isinstance(report, dict) and gw and pushed and report.get("target") == target and report.get("version") == pushed[0]:
                reports[gw] = report
                arrived.set()

        await self.client.subscribe(report_filter, on_report, qos=1)
        try:
            expected = {gateway} if gateway is not None else await self._online_members(group or "")
            if version is None:
                now_ms = int(time.time() * 1000)
                current = None if reset else await self.retained(topic)
                last = current.get("version") if isinstance(current, dict) else None
                version = max(now_ms, last + 1) if isinstance(last, int) and last < now_ms + FUTURE_SLACK_MS else now_ms
            if not 1 <= version <= MAX_VERSION:
                raise ValueError(f"version must be in [1, 2^63-1], got {version}")
            doc = make_desired(target, version, config, issued_by=issued_by or _whoami(), reset=reset)
            if key is not None:
                doc = sign(doc, key)
            pushed.append(version)
            await self.client.publish(topic, json.dumps(doc, separators=(",", ":")).encode(), qos=1, retain=True)
            deadline = asyncio.get_running_loop().time() + wait_s
            while not expected <= reports.keys() or not reports:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await arrived.wait()
                except TimeoutError:
                    break
        finally:
            self.client.unsubscribe(report_filter, on_report)
        return PushResult(version, target, dict(sorted(reports.items())), sorted(expected - reports.keys()))

    async def _online_members(self, group: str) -> set[str]:
        return {gw.id for gw in (await self.gateways()).values()
                if gw.status and gw.status.get("state") == "online" and group in gw.status.get("groups", [])}

    async def _read_retained(self, handlers: dict[str, Any]) -> None:
        """Subscribe, let the broker deliver what it retains, unsubscribe. The broker answers a
        client's packets in order, so once our own barrier message comes back, the retained
        messages sent for the subscriptions before it are in."""
        for topic_filter, handler in handlers.items():
            await self.client.subscribe(topic_filter, handler, qos=1)
        try:
            await self._barrier()
        finally:
            for topic_filter, handler in handlers.items():
                self.client.unsubscribe(topic_filter, handler)

    async def _barrier(self) -> None:
        nonce = secrets.token_bytes(8)
        waiter = asyncio.get_running_loop().create_future()
        self._barriers[nonce] = waiter
        try:
            await self.client.publish(self._barrier_topic, nonce, qos=1)
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await waiter
        finally:
            self._barriers.pop(nonce, None)

    def _on_barrier(self, message: Message) -> None:
        waiter = self._barriers.get(message.payload)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def load_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """A config to push: JSON (`.json`) or TOML, made of tables (`[proxy]`, `[fleet]`, ...)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ControllerError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ControllerError(f"{path}: must hold tables only, e.g. [proxy] and [fleet]")
    return data


def _decode(payload: bytes) -> Any:
    try:
        return decode_payload(payload)
    except Exception:
        return {"undecodable": payload[:64].hex()}


def _whoami() -> str:
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER", "unknown")
    return f"{user}@{os.uname().nodename}"


# ---------------------------------------------------------------------------------------------- CLI


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after its name (`edgectl list --broker URL`).
    A subcommand's copy has no defaults, so that it leaves a value given before the name alone."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--broker", default=default(None),
                        help="broker URL, mqtt://host:port or mqtts://host:port (default [mqtt] url of --config)")
    parser.add_argument("--config", type=Path, default=default(None),
                        help="TOML file whose [mqtt] table says how to reach the broker (TLS, user)")
    parser.add_argument("--prefix", default=default("edge"), help="topic prefix (default edge)")
    parser.add_argument("--allow-plaintext", action="store_true", default=default(None),
                        help="allow mqtt:// (no TLS) to a broker off loopback (labs only; [mqtt] allow_plaintext)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgectl", description="Fleet controller for edge-runtime gateways.")
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    ls = add("list", help="gateways with presence, config version and last telemetry")
    ls.add_argument("--json", action="store_true", help="one JSON object per gateway")
    watch = add("watch", help="telemetry as it arrives (Ctrl-C ends)")
    watch.add_argument("gateways", nargs="*", help="only these gateways")
    watch.add_argument("--json", action="store_true", help="whole messages, one JSON per line")
    watch.add_argument("--count", type=int, help="stop after this many messages")
    push = add("push", help="push a config file (TOML or JSON tables) and show the reports")
    push.add_argument("target", help="a gateway id, or group:NAME for every gateway of a group")
    push.add_argument("file", type=Path, help="config tables to push, e.g. [proxy] rate_limit_requests_per_min = 120")
    push.add_argument("--version", type=int, help="document version (default: milliseconds since the epoch)")
    push.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) to sign with (edgectl keygen)")
    push.add_argument("--wait", type=float, default=10.0, help="seconds to wait for reports (default 10; 0: do not wait)")
    reset = add("reset-version", help="push a config file as a signed version reset: taken whatever version the "
                                                 "gateway has (after a push with a version too high)")
    reset.add_argument("target", help="a gateway id, or group:NAME")
    reset.add_argument("file", type=Path, help="the config tables to put in force (the whole desired state of the target)")
    reset.add_argument("--sign-key", type=Path, required=True, help="Ed25519 private key (PEM) the gateways trust")
    reset.add_argument("--wait", type=float, default=10.0, help="seconds to wait for reports (default 10; 0: do not wait)")
    show = add("show", help="what a gateway reported, and the desired config it was sent")
    show.add_argument("gateway")
    serve = add("serve", help="the fleet console: a web page and JSON API over the fleet (docs/console.md)")
    serve.add_argument("--host", help="address to listen on (default [console] host, 127.0.0.1); off loopback, "
                                      "[console] credentials and TLS are required")
    serve.add_argument("--port", type=int, help="port (default [console] port, 8470; 0: any free port)")
    serve.add_argument("--key", type=Path, help="Ed25519 private key to sign pushes with (default [console] key_file; "
                                                "without one the console is read-only)")
    serve.add_argument("--db", help="SQLite history file (default [console] db_path; else in memory)")
    keygen = add("keygen", help="make an Ed25519 key pair for signing desired configs")
    keygen.add_argument("name", nargs="?", default="controller", help="writes NAME.key (private, 0600) and NAME.pub (default controller)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        return _keygen(args.name)
    try:
        check_prefix("--prefix", args.prefix)
        data, path = read_config_file(args.config) if args.config else ({}, None)
        mqtt = mqtt_config_from(data, path).with_overrides(url=args.broker, allow_plaintext=args.allow_plaintext)
        if args.command == "serve":
            return _serve(args, data, path, mqtt)
        if args.command in ("push", "reset-version"):
            args.gateway, args.group = _target(args.target)
        return asyncio.run(_run(args, mqtt))
    except (ConfigError, ControllerError, KeyFileError, ValueError) as exc:
        print(f"edgectl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _serve(args: argparse.Namespace, data: dict[str, Any], path: Path | None, mqtt: MqttConfig) -> int:
    from edge_runtime.logs import setup_logging

    from .console.config import console_config_from
    from .console.server import serve

    setup_logging("warning")  # JSON lines on stderr, as the gateway's daemons log

    config = console_config_from(data, path).with_overrides(host=args.host, port=args.port, db_path=args.db,
                                                            key_file=str(args.key) if args.key else None)
    try:
        asyncio.run(serve(config, mqtt, args.prefix))
    except OSError as exc:  # the port is taken, the TLS files cannot be read
        raise ControllerError(f"cannot serve on {config.host}:{config.port}: {exc}") from None
    return EXIT_OK


def _target(text: str) -> tuple[str | None, str | None]:
    """"gw-1" -> (gateway, None); "group:lab" -> (None, group)."""
    if text.startswith(GROUP_PREFIX):
        return None, check_name("group", text[len(GROUP_PREFIX):])
    return check_name("gateway", text), None


async def _run(args: argparse.Namespace, mqtt: MqttConfig) -> int:
    pushing = args.command in ("push", "reset-version")
    key = load_private_key(args.sign_key) if pushing and args.sign_key else None
    config = load_config_file(args.file) if pushing else None
    async with Controller(mqtt, args.prefix) as ctl:
        if args.command == "list":
            return _print_list(await ctl.gateways(), args.json)
        if args.command == "watch":
            return await _watch(ctl, args)
        if args.command == "show":
            report = await ctl.retained(ctl.topics.reported(args.gateway))
            desired = await ctl.retained(ctl.topics.desired(args.gateway))
            print(json.dumps({"reported": report, "desired": desired}, indent=2, ensure_ascii=False))
            return EXIT_OK if report or desired else EXIT_NO_REPORT
        assert config is not None
        result = await ctl.push(config, gateway=args.gateway, group=args.group, version=getattr(args, "version", None), key=key,
                                wait_s=args.wait, reset=args.command == "reset-version")
        return _print_push(result, args.wait)


def _print_list(gateways: dict[str, Gateway], as_json: bool) -> int:
    if as_json:
        for gw in gateways.values():
            print(json.dumps({"gateway": gw.id, "status": gw.status, "telemetry": gw.telemetry, "reported": gw.reported}, default=str))
        return EXIT_OK
    rows = [("GATEWAY", "STATE", "BOOT", "CONFIG", "TELEMETRY", "CPU%", "MEM%", "ENGINE")]
    now = time.time()
    for gw in gateways.values():
        status, tel, rep = gw.status or {}, gw.telemetry or {}, gw.reported or {}
        host = tel.get("host", {})
        engine = tel.get("engine")
        rows.append((
            gw.id,
            str(status.get("state", "?")) + (f" ({status['reason']})" if status.get("reason") else "")
            + (" UNSIGNED-CONFIG-ALLOWED" if status.get("allow_unsigned") else ""),
            str(status.get("boot", "")),
            _layers(rep.get("applied")) + (" (restart pending)" if rep.get("needs_restart") else "")
            + (f" (overridden: {','.join(sorted(rep['overridden']))})" if rep.get("overridden") else ""),
            _age(now - tel["ts"]) if isinstance(tel.get("ts"), (int, float)) else "-",
            _num(host.get("cpu_percent")),
            _num(host.get("mem_percent")),
            "-" if engine is None else ("down" if not engine.get("up") else
                                        f"q{engine.get('queue_depth', '?')} r{engine.get('running', '?')} {engine.get('tokens_per_s', 0)} tok/s"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return EXIT_OK


async def _watch(ctl: Controller, args: argparse.Namespace) -> int:
    seen = 0
    async for gw, tel in ctl.watch(args.gateways or None):
        if args.json:
            print(json.dumps({"gateway": gw, **tel}, default=str), flush=True)
        else:
            host, engine, fleet = tel.get("host", {}), tel.get("engine") or {}, tel.get("fleet", {})
            when = time.strftime("%H:%M:%S", time.localtime(tel.get("ts", time.time())))
            line = f"{when} {gw} seq={tel.get('seq')} cpu={_num(host.get('cpu_percent'))}% mem={_num(host.get('mem_percent'))}%"
            if engine:
                line += f" engine={'up' if engine.get('up') else 'down'} queue={engine.get('queue_depth', '-')} tok/s={engine.get('tokens_per_s', '-')}"
            if fleet.get("buffered") or fleet.get("dropped"):
                line += f" buffered={fleet.get('buffered')} dropped={fleet.get('dropped')}"
            print(line, flush=True)
        seen += 1
        if args.count and seen >= args.count:
            break
    return EXIT_OK


def _print_push(result: PushResult, wait_s: float) -> int:
    print(f"pushed version {result.version} to {result.target}")
    for gw, report in result.reports.items():
        print(f"{gw}: {report['status']} (in force: {_layers(report.get('applied'))})")
        for key, outcome in sorted(report.get("results", {}).items()):
            print(f"  {key}: {outcome}")
        for key, reason in sorted(report.get("reasons", {}).items()):
            print(f"  {key}: {reason}")
        if report.get("needs_restart"):
            print(f"  restart pending for: {', '.join(report['needs_restart'])}")
        for key, flag in sorted((report.get("overridden") or {}).items()):
            print(f"  {key}: not in force: {flag} on the gateway's command line sets it")
    for gw in result.missing:
        print(f"{gw}: no report within {wait_s:g} s (it applies the config when it next connects)")
    if wait_s > 0 and not result.reports and not result.missing:
        print("no gateway reported (none online in the group?)")
    if wait_s <= 0:
        return EXIT_OK
    if result.missing or not result.reports:
        return EXIT_NO_REPORT
    return EXIT_OK if result.ok else EXIT_REJECTED


def _keygen(name: str) -> int:
    private, public = Path(f"{name}.key"), Path(f"{name}.pub")
    try:
        key = generate_keypair(private, public)
    except FileExistsError:
        print(f"edgectl: error: {private} exists; not overwriting a key", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"edgectl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"private key: {private} (keep it on the controller)\npublic key:  {public} (install on gateways as [fleet] controller_public_key)")
    print(f"fingerprint: {public_key_text(key)}")
    return EXIT_OK


def _layers(applied: Any) -> str:
    """{"group:lab": 3, "gw-1": 7} -> "group:lab=3 gw-1=7"."""
    return " ".join(f"{t}={v}" for t, v in applied.items()) if isinstance(applied, dict) and applied else "-"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.0f}h ago"


def _num(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "-"


if __name__ == "__main__":
    sys.exit(main())
