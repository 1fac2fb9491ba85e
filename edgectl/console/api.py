"""The console's JSON API (docs/console.md, "JSON API"): what the page shows, usable by scripts.

    GET  /api/v1/session                 who you are, read-only or not, the CSRF token for POSTs
    GET  /api/v1/gateways                the overview: counts and one row per gateway
    GET  /api/v1/gateways/{id}           one gateway: its row, latest telemetry, report, per-key config status
    GET  /api/v1/gateways/{id}/series    chart points: ?window=SECONDS (default 900) [&since=TS: only newer ones]
    GET  /api/v1/gateways/{id}/pushes    documents pushed to it or its groups, who issued them, its report on each
    POST /api/v1/validate                {"target", "toml"}: the gateway's own rules applied to a config
    POST /api/v1/push                    {"target", "toml"[, "force"]}: sign and publish (202), reports follow

Errors: {"error": {"message", "code"[, "reasons"]}} with a 4xx/5xx status."""

from __future__ import annotations

import json
import math
import secrets
import time
import tomllib
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from edge_wire.settings import ConfigError
from proxy.fleet import schema
from proxy.fleet.document import GROUP_PREFIX, flatten, group_target
from proxy.mqtt import check_name

from .auth import CSRF_HEADER, SESSION_COOKIE, USER, Access, error
from .config import ConsoleConfig
from .fleet_listener import FleetListener, GatewayState
from .health import FLAGS, flags
from .metrics import as_dict

LISTENER = web.AppKey("console_listener", FleetListener)
ACCESS = web.AppKey("console_access", Access)
CONFIG = web.AppKey("console_config", ConsoleConfig)
TABLES = web.AppKey("console_tables", dict)
FINGERPRINT = web.AppKey("console_fingerprint", str)
MAX_BODY_BYTES = 256 << 10  # a desired document's limit (proxy/fleet/document.py)
MAX_WINDOW_S = 31 * 86400


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/session", session)
    app.router.add_get("/api/v1/gateways", overview)
    app.router.add_get("/api/v1/gateways/{id}", gateway)
    app.router.add_get("/api/v1/gateways/{id}/series", series)
    app.router.add_get("/api/v1/gateways/{id}/pushes", pushes)
    app.router.add_post("/api/v1/validate", validate)
    app.router.add_post("/api/v1/push", push)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps, headers={"Cache-Control": "no-store"})


def _dumps(data: Any) -> str:
    """Strict JSON (a browser's JSON.parse refuses NaN): a gateway's non-finite number becomes null."""
    try:
        return json.dumps(data, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), separators=(",", ":"), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def session(request: web.Request) -> web.Response:
    app = request.app
    token = request.cookies.get(SESSION_COOKIE) or _new_session()
    listener = app[LISTENER]
    body = {"user": request[USER], "read_only": listener.key is None, "key_fingerprint": app[FINGERPRINT] or None,
            "csrf": app[ACCESS].csrf_token(token), "csrf_header": CSRF_HEADER, "broker_connected": listener.connected,
            "flags": list(FLAGS)}
    response = _json(body)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", secure=request.scheme == "https", path="/")
    return response


async def overview(request: web.Request) -> web.Response:
    listener, config = request.app[LISTENER], request.app[CONFIG]
    rows = [row(state, listener, config) for state in sorted(listener.gateways.values(), key=lambda s: s.id)]
    counts = {"total": len(rows), "online": sum(r["state"] == "online" for r in rows)}
    counts["offline"] = counts["total"] - counts["online"]
    counts["unhealthy"] = sum(bool(set(r["flags"]) - {"offline"}) for r in rows)
    counts.update({f: sum(f in r["flags"] for r in rows) for f in FLAGS})
    return _json({"now": time.time(), "broker_connected": listener.connected, "counts": counts, "gateways": rows})


def row(state: GatewayState, listener: FleetListener, config: ConsoleConfig) -> dict[str, Any]:
    status, tel, rep = state.status or {}, state.telemetry or {}, state.reported or {}
    host, engine, model = as_dict(tel.get("host")), as_dict(tel.get("engine")), as_dict(as_dict(tel.get("engine")).get("model"))
    applied = as_dict(rep.get("applied"))
    since = state.since
    if status.get("state") != "online" and isinstance(tel.get("ts"), (int, float)) and (since is None or tel["ts"] > since):
        since = tel["ts"]  # a Last Will carries the connect time: the last telemetry is nearer to when it went
    return {
        "id": state.id,
        "state": status.get("state", "unknown"),
        "since": since,
        "reason": status.get("reason"),
        "boot": status.get("boot", tel.get("boot")),
        "version": status.get("version"),
        "groups": _groups(state),
        "allow_unsigned": status.get("allow_unsigned"),
        "model": model.get("id"),
        "engine_up": engine.get("up") if engine else None,
        "telemetry_ts": tel.get("ts"),
        "cpu": host.get("cpu_percent"),
        "mem": host.get("mem_percent"),
        "config": {t: {"desired": (listener.desired.get(t) or {}).get("version"), "applied": applied.get(t)} for t in _targets(state)},
        "report": {"status": rep.get("status"), "target": rep.get("target"), "version": rep.get("version")} if rep else None,
        "flags": flags(state.status, state.reported, state.telemetry, state.recent, config),
    }


def _groups(state: GatewayState) -> list[str]:
    groups = (state.status or {}).get("groups")
    return [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []


def _targets(state: GatewayState) -> list[str]:
    """The gateway's layers, lowest first: its groups, then itself (sync.targets_of)."""
    return [*(group_target(g) for g in _groups(state)), state.id]


def _state(request: web.Request) -> GatewayState:
    state = request.app[LISTENER].gateways.get(request.match_info["id"])
    if state is None:
        raise error(404, f"no gateway {request.match_info['id']!r} on the broker", "not_found")
    return state


async def gateway(request: web.Request) -> web.Response:
    listener, state = request.app[LISTENER], _state(request)
    targets = _targets(state)
    return _json({**row(state, listener, request.app[CONFIG]), "telemetry": state.telemetry, "reported": state.reported,
                  "desired": {t: listener.desired.get(t) for t in targets}, "keys": key_status(state, listener, targets)})


def key_status(state: GatewayState, listener: FleetListener, targets: list[str]) -> list[dict[str, Any]]:
    """Each key of the desired documents of the gateway's layers, with what the gateway says
    about it: applied, needs_restart (pending: restart), rejected (and why), pending (no report
    on that version yet), or in force (applied in an earlier report)."""
    rep = state.reported or {}
    applied, reasons, results = as_dict(rep.get("applied")), as_dict(rep.get("reasons")), as_dict(rep.get("results"))
    restart = {k for k in rep.get("needs_restart") or () if isinstance(k, str)} if isinstance(rep.get("needs_restart"), list) else set()
    rows = []
    for target in targets:
        doc = listener.desired.get(target)
        if doc is None:
            continue
        answered = rep.get("target") == target and rep.get("version") == doc["version"]
        for key, value in sorted(flatten(doc["config"]).items()):
            reason = None
            if answered and rep.get("status") == "rejected":
                status = "rejected"
                reason = reasons.get(key)
            elif answered and key in results:
                status = str(results[key])
                reason = reasons.get(key)
            elif applied.get(target) == doc["version"]:
                status = "in force"
            else:
                status = "pending"
            if key in restart and status in ("in force", "applied", "needs_restart"):
                status = "needs_restart"
            rows.append({"target": target, "version": doc["version"], "key": key, "value": value, "status": status, "reason": reason})
    return rows


async def series(request: web.Request) -> web.Response:
    state = _state(request)
    window = _number(request.query.get("window", "900"), "window", 10, MAX_WINDOW_S)
    now = time.time()
    since = max(now - window, _number(request.query.get("since", "0"), "since", 0, now + 86400))
    listener = request.app[LISTENER]
    listener.store.flush()  # the points of the last second too
    return _json({"now": now, "window": window, "points": listener.store.series(state.id, since)})


async def pushes(request: web.Request) -> web.Response:
    listener, state = request.app[LISTENER], _state(request)
    return _json({"pushes": listener.store.pushes(_targets(state), state.id)})


async def validate(request: web.Request) -> web.Response:
    target, config, _ = await _read_push(request)
    reasons = schema.validate(config, request.app[TABLES], signed=request.app[LISTENER].key is not None)
    return _json({"target": target, "config": config, "ok": not reasons, "reasons": reasons})


async def push(request: web.Request) -> web.Response:
    listener = request.app[LISTENER]
    if listener.key is None:
        raise error(403, "read-only: the console has no signing key (edgectl serve --key FILE)", "read_only")
    target, config, body = await _read_push(request)
    reasons = schema.validate(config, request.app[TABLES], signed=True)
    if reasons and body.get("force") is not True:
        raise error(400, "the config breaks the gateways' rules (send force: true to let the gateways decide)", "invalid_config",
                    reasons=reasons)
    if not listener.connected:
        raise error(503, "the broker is not reachable", "broker_down")
    gateway, group = (None, target[len(GROUP_PREFIX):]) if target.startswith(GROUP_PREFIX) else (target, None)
    version = await listener.push(config, gateway=gateway, group=group, issued_by=request[USER])
    return _json({"target": target, "version": version, "issued_by": request[USER]}, status=202)


async def _read_push(request: web.Request) -> tuple[str, dict[str, dict[str, Any]], dict[str, Any]]:
    """(target, config tables, body) from a {"target", "toml"} body; 400 with the reason otherwise."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise error(413, f"body over {MAX_BODY_BYTES} bytes", "too_large")
    try:
        body = json.loads(await request.content.read(MAX_BODY_BYTES + 1))
    except (ValueError, UnicodeDecodeError):
        raise error(400, "body must be JSON: {\"target\": ..., \"toml\": ...}", "bad_request") from None
    if not isinstance(body, dict) or not isinstance(body.get("toml"), str) or not isinstance(body.get("target"), str):
        raise error(400, "body must be {\"target\": \"gw-1\" | \"group:NAME\", \"toml\": \"[proxy]\\n...\"}", "bad_request")
    target = body["target"]
    try:
        check_name("group" if target.startswith(GROUP_PREFIX) else "gateway", target.removeprefix(GROUP_PREFIX))
    except ConfigError as exc:
        raise error(400, str(exc), "bad_target") from None
    try:
        config = tomllib.loads(body["toml"])
    except tomllib.TOMLDecodeError as exc:
        raise error(400, f"invalid TOML: {exc}", "bad_toml", reasons={"toml": str(exc)}) from None
    if not all(isinstance(v, Mapping) for v in config.values()):
        bad = [k for k, v in config.items() if not isinstance(v, Mapping)]
        raise error(400, "a config holds tables only, e.g. [proxy]", "bad_toml", reasons={k: "must be a table, e.g. [proxy]" for k in bad})
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError):  # TOML dates and times, inf, nan: a document carries JSON values
        raise error(400, "values must be JSON values (no dates, times, inf or nan)", "bad_toml",
                    reasons={"toml": "values must be JSON values (no dates, times, inf or nan)"}) from None
    return target, config, body


def _number(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise error(400, f"{name}: must be a number, got {text!r}", "bad_request") from None
    if not low <= value <= high:
        raise error(400, f"{name}: must be in [{low:g}, {high:g}], got {value:g}", "bad_request")
    return value


def _new_session() -> str:
    return secrets.token_urlsafe(24)
