"""What a controller may change: the managed tables of config.toml. A pushed value is checked by
the very model (edge_wire.settings Table) its table's loader builds, so it obeys the rules a value
in the file does, and each key at fault gets its own reason."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from edge_wire.settings import (
    SECRET,
    ConfigError,
    Table,
    hints,
    read_config_file,
    split,
    table_keys,
)

from .config import load_fleet_config
from .document import flatten

# Keys that stay with the gateway's own file: a push could otherwise cut it off from its controller.
FLEET_LOCKED = {
    "enabled": "set locally (a push could switch fleet sync off for good)",
    "gateway_id": "the gateway's identity is set locally",
    "groups": "set locally (membership decides which desired documents apply)",
    "topic_prefix": "set locally (a push could move the gateway out of its controller's reach)",
    "state_dir": "set locally",
    "controller_public_key": "trust anchors are set locally",
    "allow_unsigned": "trust anchors are set locally",
    "max_clock_skew_s": "trust anchors are set locally (it bounds how far a pushed version may jump)",
}
UNMANAGED = {
    "mqtt": "broker settings are set locally (a wrong push would cut the gateway off)",
    # The engine runs as another user and reads only its own file: a pushed key would never apply.
    "engine": "set locally (the engine does not read pushed config)",
    "cloud": "set locally (cloud workers are not managed as gateways)",
}
# [devices] keys that stay local: the reply prefix bounds where devices can make the gateway publish.
DEVICES_LOCKED = {"reply_prefix": "set locally (it bounds where devices can make the gateway publish)"}
# Keys a push may set only when signed by the controller: they decide who may call the gateway,
# where it listens, or where prompts go. Fields marked SECRET in any table are signed-only too.
_WHO = "decides who may call the gateway"
_WHERE = "decides where the gateway listens or what it talks to"
_PROMPTS = "decides when prompts leave the gateway (offload)"
PROXY_SIGNED_ONLY = {"api_keys": _WHO, "jwt": _WHO, "host": _WHERE, "port": _WHERE, "engine_socket": _WHERE}
DEVICES_SIGNED_ONLY = {"enabled": _WHO}
OFFLOAD_SIGNED_ONLY = {"enabled": _PROMPTS, "max_wait_s": _PROMPTS, "max_cpu_temp_c": _PROMPTS, "max_memory_percent": _PROMPTS}
# In [offload] and [devices] (where authentication lives) an unsigned document may set only these
# operational bounds: any other key, one added later included, needs a signature.
OFFLOAD_UNSIGNED = frozenset({"status_interval_s", "accept_timeout_s", "idle_timeout_s", "breaker_failures", "breaker_cooldown_s",
                              "max_in_flight", "retry_local"})
DEVICES_UNSIGNED = frozenset({"max_payload_bytes", "max_concurrent", "rate_limit_requests_per_min", "rate_limit_tokens_per_min",
                              "default_max_tokens", "default_temperature"})
_NOT_UNSIGNED = "not among the keys an unsigned document may set"
SIGNED_ONLY_REASON = "{why}: settable only in a document signed by the controller"
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class ManagedTable:
    config: Table  # the table as the local file gives it: pushed values are checked as changes to it
    running: Mapping[str, Any]  # its keys' values, defaults filled in
    locked: Mapping[str, str] = field(default_factory=dict)  # key -> why a controller may not set it
    signed_only: Mapping[str, str] = field(default_factory=dict)  # key -> why only a signed document may set it


def fleet_table(fleet: Any) -> ManagedTable:
    """`[fleet]`, with the keys that stay local locked."""
    return managed(fleet, FLEET_LOCKED)


def managed(config: Table, locked: Mapping[str, str] | None = None, signed_only: Mapping[str, str] | None = None,
            unsigned: frozenset[str] | None = None) -> ManagedTable:
    """A table managed through `config`, as loaded from the file (ProxyConfig, OffloadConfig, ...).
    Signed-only: its SECRET fields, `signed_only`, and, when `unsigned` is given, every key
    outside it (the table's keys are then unsigned-settable by name only)."""
    running = {key: getattr(config, key) for key in table_keys(type(config))}
    guarded = {key: _NOT_UNSIGNED for key in running if unsigned is not None and key not in unsigned}
    secrets = {name: "a secret" for name, tp in hints(type(config)).items() if SECRET in split(tp)[1] and name in running}
    return ManagedTable(config, running, dict(locked or {}), {**guarded, **secrets, **(signed_only or {})})


def default_tables(path: Path | None = None) -> dict[str, ManagedTable]:
    """proxy, fleet, offload and devices, as loaded from the config file at `path` (or its default)."""
    from ..config import load_config as load_proxy_config
    from ..offload.config import devices_config_from, offload_config_from

    data, found = read_config_file(path)
    return {"proxy": managed(load_proxy_config(path), signed_only=PROXY_SIGNED_ONLY), "fleet": fleet_table(load_fleet_config(path)),
            "offload": managed(offload_config_from(data, found), signed_only=OFFLOAD_SIGNED_ONLY, unsigned=OFFLOAD_UNSIGNED),
            "devices": managed(devices_config_from(data, found), DEVICES_LOCKED, DEVICES_SIGNED_ONLY, DEVICES_UNSIGNED)}


def validate(config: dict[str, dict[str, Any]], tables: Mapping[str, ManagedTable],
             in_force: dict[str, dict[str, Any]] | None = None, *, signed: bool = True) -> dict[str, str]:
    """Reasons by `table.key` (or by table) for everything in `config` that may not be applied.
    Each key is checked alone, then each table as it would be in force (`in_force`: the merged
    layers with `config` among them; default `config` itself), for rules that tie keys together.
    `signed`: whether the document carries the controller's verified signature (the caller
    checked it); without one, signed-only keys are refused."""
    in_force = config if in_force is None else in_force
    reasons: dict[str, str] = {}
    for name, values in config.items():
        spec = tables.get(name)
        if spec is None:
            reasons[name] = UNMANAGED.get(name, f"unknown table (managed: {', '.join(sorted(tables))})")
            continue
        table_reasons: dict[str, str] = {}
        for key, value in values.items():
            if key not in spec.running:
                table_reasons[f"{name}.{key}"] = "unknown key"
            elif key in spec.locked:
                table_reasons[f"{name}.{key}"] = spec.locked[key]
            elif key in spec.signed_only and not signed:
                table_reasons[f"{name}.{key}"] = SIGNED_ONLY_REASON.format(why=spec.signed_only[key])
            else:
                error = _check(spec, {key: value})
                if error is not None and error.startswith(f"{key}:"):  # not a rule tying it to keys set below
                    table_reasons[f"{name}.{key}"] = _strip_key(error, key)
        if not table_reasons and values:  # each key is fine alone; are they together?
            error = _check(spec, in_force.get(name, values))
            if error is not None:
                culprit = error.split(":", 1)[0]
                if culprit in values:
                    table_reasons[f"{name}.{culprit}"] = _strip_key(error, culprit)
                else:
                    table_reasons[name] = error[:MAX_REASON_CHARS]
        reasons.update(table_reasons)
    return reasons


def changes(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], tables: Mapping[str, ManagedTable]) -> dict[str, Any]:
    """`table.key` -> value for every key whose value in force differs between the two documents
    (a key a document leaves out has its running value)."""
    before, after = flatten(old), flatten(new)
    out: dict[str, Any] = {}
    for key in sorted(before.keys() | after.keys()):
        running = running_value(key, tables)
        if running is _MISSING:
            continue  # a table no longer managed (after an upgrade): nothing to apply
        then, now = before.get(key, running), after.get(key, running)
        if normalize(then) != normalize(now):
            out[key] = now
    return out


def value_in_force(key: str, config: dict[str, dict[str, Any]], tables: Mapping[str, ManagedTable]) -> Any:
    table, name = key.split(".", 1)
    values = config.get(table, {})
    return values[name] if name in values else running_value(key, tables)


def running_value(key: str, tables: Mapping[str, ManagedTable]) -> Any:
    table, name = key.split(".", 1)
    spec = tables.get(table)
    return _MISSING if spec is None or name not in spec.running else spec.running[name]


def overlay(data: dict[str, Any], config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The parsed config file `data` with a desired document's `config` laid over it: what a
    process reads at start so that pushed keys ("needs restart" ones too) stay in force."""
    merged = dict(data)
    for table, values in config.items():
        merged[table] = {**merged.get(table, {}), **values}
    return merged


def normalize(value: Any) -> Any:
    """Lists and tuples compare equal (the file gives tuples, JSON gives lists)."""
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


_MISSING = object()


def _check(spec: ManagedTable, values: Mapping[str, Any]) -> str | None:
    try:
        msgspec.structs.replace(spec.config, **values)  # validated as the loader validates
    except ConfigError as exc:
        return str(exc)
    return None


def _strip_key(message: str, key: str) -> str:
    """ConfigError messages start with the key; the report already says which key."""
    message = message[len(key) + 2:] if message.startswith(f"{key}: ") else message
    return message[:MAX_REASON_CHARS]
