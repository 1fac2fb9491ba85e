"""Desired/reported config sync: take a desired document from the controller, refuse it (with
reasons) or apply it, keep it on disk, and say what happened in a reported document.

Layers: a gateway takes desired documents for each of its groups and for itself. Each target
(`group:NAME`, or the gateway id) has its own applied document and its own version sequence;
the config in force is the gateway's file, overlaid by the group documents in the order of
`[fleet] groups`, overlaid by the gateway's own document. Each document is the whole desired
state of its layer: a key it leaves out falls back to the layers below.

A document is refused when it is malformed, for another target, unsigned (unless the gateway
allows unsigned pushes) or badly signed, not newer than its target's applied one (a replay),
more than `max_clock_skew_s` ahead of the gateway's clock (versions are issue times in
milliseconds: one push cannot pin a version out of the controller's reach), or when any key is
unknown, locked, out of range, or signed-only in an unsigned document (nor may an unsigned
document change such a key by leaving it out); the config in force then stays as it was.

An accepted one is applied: keys the agent or the sidecar can change live are changed, the rest
are reported as needing a restart (they are in force from the next start: see applied_config).

A signed document with `"reset": true`, issued within the clock skew (and after the last reset),
is accepted whatever its target's applied version: the controller's way back from a version set
too high (edgectl reset-version).

State (`config-state.json` in the state directory, written atomically): the applied document
of each layer, the digest of the last payload processed per target (the retained desired
config comes again on every reconnect and is not processed twice), the issue time of the last
reset per target (a reset is not taken twice), and the last report."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import schema
from .atomic import read_json, write_json
from .config import FleetConfig
from .document import DocumentError, flatten, group_target, parse_desired
from .schema import ManagedTable
from .signing import SIGNATURE_FIELD, canonical_bytes, verify

log = logging.getLogger("proxy.fleet.sync")

STATE_FILE = "config-state.json"
APPLIED, NEEDS_RESTART = "applied", "needs_restart"

ApplyHook = Callable[[dict[str, Any]], dict[str, str] | Awaitable[dict[str, str]]]
OwnApply = Callable[[dict[str, Any]], dict[str, str]]


def targets_of(fleet: FleetConfig) -> list[str]:
    """The layers of a gateway, lowest first: its groups in order, then itself."""
    return [*(group_target(g) for g in fleet.groups), fleet.resolved_gateway_id()]


def applied_config(fleet: FleetConfig) -> dict[str, dict[str, Any]]:
    """The pushed config in force ({} if none), to lay over the config file at start
    (schema.overlay), so that pushed keys, "needs restart" ones included, stay in force."""
    state = read_json(fleet.resolved_state_dir() / STATE_FILE) or {}
    return _merge(state.get("layers", {}), targets_of(fleet))


def _merge(layers: Mapping[str, Any], targets: list[str]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for target in targets:
        if target in layers:
            for table, values in layers[target]["document"]["config"].items():
                merged[table] = {**merged.get(table, {}), **values}
    return merged


class ConfigSync:
    def __init__(
        self,
        *,
        gateway_id: str,
        targets: list[str],
        state_dir: Path,
        tables: Mapping[str, ManagedTable],
        public_key: Ed25519PublicKey | None,
        allow_unsigned: bool,
        max_clock_skew_s: float,
        apply_own: OwnApply,
        on_apply: ApplyHook | None,
        boot: int,
        command_line: Mapping[str, str] | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.targets = targets
        self.path = Path(state_dir) / STATE_FILE
        self.tables = tables
        self.public_key = public_key
        self.allow_unsigned = allow_unsigned
        self.max_clock_skew_s = max_clock_skew_s
        self.apply_own = apply_own  # fleet.* keys: the agent's own
        self.on_apply = on_apply  # the rest: the sidecar's
        self.boot = boot
        self.command_line = dict(command_line or {})  # `table.key` -> the process's flag that sets it
        state = read_json(self.path) or {}
        # A group the gateway has left no longer counts.
        self._layers: dict[str, dict[str, Any]] = {t: v for t, v in state.get("layers", {}).items() if t in targets}
        self._seen: dict[str, str] = {t: v for t, v in state.get("seen", {}).items() if t in targets}
        self._resets: dict[str, float] = {t: v for t, v in state.get("resets", {}).items() if t in targets}
        self._boot_config = self.config  # in force since this process started
        self._pending_restart: set[str] = set()
        report = state.get("report")  # the last outcome, with the state it describes brought up to date
        self.report: dict[str, Any] | None = {**report, "applied": self.versions, "needs_restart": [],
                                              "overridden": self.overridden()} if report else None
        self._lock = asyncio.Lock()  # one document at a time, in arrival order

    @property
    def versions(self) -> dict[str, int]:
        """The applied version of each layer, lowest first."""
        return {t: self._layers[t]["version"] for t in self.targets if t in self._layers}

    def overridden(self) -> dict[str, str]:
        """Pushed keys not in force because a command-line flag sets them (`edge-proxy --port`):
        `table.key` -> the flag. The report says so, rather than claim them in force."""
        pushed = flatten(self.config)
        return {key: flag for key, flag in sorted(self.command_line.items()) if key in pushed}

    @property
    def config(self) -> dict[str, dict[str, Any]]:
        """The pushed config in force: the layers merged."""
        return _merge(self._layers, self.targets)

    async def handle(self, target: str, payload: bytes) -> dict[str, Any] | None:
        """Process one desired payload for `target`; returns the new report, or None when there
        is nothing new (the same payload again, or an empty one: a retained message cleared)."""
        async with self._lock:
            return await self._handle(target, payload)

    async def _handle(self, target: str, payload: bytes) -> dict[str, Any] | None:
        digest = hashlib.sha256(payload).hexdigest()
        if not payload or self._seen.get(target) == digest:
            return None
        self._seen[target] = digest
        version: int | None = None
        signed: bool | None = None
        try:
            doc = parse_desired(payload, target)
            version = doc["version"]
            signed = self._check_signature(doc)
            if self._is_current(target, doc):
                return self._finish(version, target, "applied", signed=signed, results={})
            self._check_version(target, doc, signed)
            new_layers = {**self._layers, target: {"version": version, "digest": _digest(doc), "document": doc}}
            new_config = _merge(new_layers, self.targets)
            reasons = schema.validate(doc["config"], self.tables, in_force=new_config, signed=signed)
            changed = schema.changes(self.config, new_config, self.tables)
            if not signed:  # leaving a signed-only key out would change it too (back to the file's value)
                for key in changed:
                    why = _signed_only(key, self.tables)
                    if why is not None:
                        reasons.setdefault(key, schema.SIGNED_ONLY_REASON.format(why=why))
            if reasons:
                raise DocumentError(reasons)
        except DocumentError as exc:
            log.warning("desired config refused", extra={"target": target, "version": version, "reasons": exc.reasons})
            return self._finish(version, target, "rejected", signed=signed, reasons=exc.reasons)
        if doc.get("reset"):
            self._resets[target] = doc["issued_at"]
            log.warning("desired config version reset by the controller", extra={"target": target, "version": version})
        results = await self._apply(changed)
        self._layers = new_layers
        self._track_restarts(results)
        failed = {k: r for k, r in results.items() if r not in (APPLIED, NEEDS_RESTART)}
        log.info("desired config applied", extra={"target": target, "version": version, "changed": sorted(changed), "failed": sorted(failed)})
        return self._finish(version, target, "partial" if failed else "applied", signed=signed, results=results, reasons=failed)

    def _check_signature(self, doc: dict[str, Any]) -> bool:
        """Whether `doc` carries the controller's signature; raises when it is required and
        missing, or present and wrong."""
        if SIGNATURE_FIELD not in doc and self.allow_unsigned:
            return False
        if self.public_key is None:  # allow_unsigned is set (the agent starts only so): nothing to verify with
            return False
        problem = verify(doc, self.public_key)
        if problem is not None:
            raise DocumentError({SIGNATURE_FIELD: problem})
        return True

    def _is_current(self, target: str, doc: dict[str, Any]) -> bool:
        """The applied document itself, sent again (re-encoded, or re-signed): nothing to do."""
        layer = self._layers.get(target)
        return layer is not None and doc["version"] == layer["version"] and _digest(doc) == layer["digest"]

    def _check_version(self, target: str, doc: dict[str, Any], signed: bool) -> None:
        version, now = doc["version"], time.time()
        ahead_s = version / 1000 - now
        if ahead_s > self.max_clock_skew_s:
            raise DocumentError({"version": f"{version} is {ahead_s:.0f} s ahead of this gateway's clock (versions are issue times "
                                            f"in milliseconds since the epoch; at most max_clock_skew_s = {self.max_clock_skew_s:g} ahead)"})
        if doc.get("reset"):
            self._check_reset(target, doc, signed, now)
            return
        layer = self._layers.get(target)
        if layer is not None and version <= layer["version"]:
            raise DocumentError({"version": f"{version} is not newer than the applied version {layer['version']} (replayed or out of date)"})

    def _check_reset(self, target: str, doc: dict[str, Any], signed: bool, now: float) -> None:
        """A reset is taken only signed, fresh, and newer than the last one: a replayed reset
        could otherwise roll the config back."""
        if not signed:
            raise DocumentError({"reset": "a version reset must be signed by the controller"})
        issued_at = doc.get("issued_at")
        if issued_at is None or abs(now - issued_at) > self.max_clock_skew_s:
            raise DocumentError({"issued_at": f"a version reset must be issued within max_clock_skew_s = {self.max_clock_skew_s:g} "
                                              f"of this gateway's clock, got {issued_at!r} (replayed?)"})
        last = self._resets.get(target)
        if last is not None and issued_at <= last:
            raise DocumentError({"issued_at": f"{issued_at} is not after the last reset ({last}): replayed"})

    async def _apply(self, changed: dict[str, Any]) -> dict[str, str]:
        own = {k: v for k, v in changed.items() if k.startswith("fleet.")}
        rest = {k: v for k, v in changed.items() if k not in own}
        results = self.apply_own(own) if own else {}
        if rest and self.on_apply is None:
            results.update(dict.fromkeys(rest, NEEDS_RESTART))
        elif rest:
            try:
                out = self.on_apply(dict(rest))
                if inspect.isawaitable(out):
                    out = await out
            except Exception as exc:
                log.exception("on_apply hook failed")
                out = dict.fromkeys(rest, f"apply failed: {exc}")
            for key in rest:  # a key the hook does not mention takes effect at the next start
                result = out.get(key, NEEDS_RESTART) if isinstance(out, dict) else NEEDS_RESTART
                results[key] = str(result)[: schema.MAX_REASON_CHARS]
        return results

    def _track_restarts(self, results: dict[str, str]) -> None:
        config = self.config
        for key, result in results.items():
            now = schema.normalize(schema.value_in_force(key, config, self.tables))
            at_boot = schema.normalize(schema.value_in_force(key, self._boot_config, self.tables))
            if result == NEEDS_RESTART and now != at_boot:
                self._pending_restart.add(key)
            else:
                self._pending_restart.discard(key)

    def _finish(self, version: int | None, target: str, status: str, *, signed: bool | None, results: dict[str, str] | None = None,
                reasons: dict[str, str] | None = None) -> dict[str, Any]:
        self.report = {
            "gateway": self.gateway_id,
            "boot": self.boot,
            "ts": round(time.time(), 3),
            "target": target,  # the document this report answers
            "version": version,
            "signed": signed,  # whether it carried the controller's signature (None: unreadable)
            "allow_unsigned": self.allow_unsigned,  # this gateway takes unsigned pushes (labs)
            "status": status,  # applied | partial (some keys failed to apply live) | rejected
            "reasons": reasons or {},  # by key (or document field): why refused, or why a key failed
            "results": results or {},  # by key changed: applied | needs_restart | why it failed
            "applied": self.versions,  # the version in force for each layer
            "needs_restart": sorted(self._pending_restart),  # changed since start, in force after a restart
            "overridden": self.overridden(),  # pushed, but set by a command-line flag instead: not in force
        }
        write_json(self.path, {"format": 1, "layers": self._layers, "seen": self._seen, "resets": self._resets, "report": self.report})
        return self.report


def _signed_only(key: str, tables: Mapping[str, ManagedTable]) -> str | None:
    table, name = key.split(".", 1)
    spec = tables.get(table)
    return None if spec is None else spec.signed_only.get(name)


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(doc)).hexdigest()
