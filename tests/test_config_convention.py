"""The config convention (edge_wire/settings.py) over every config table: each field carries a rule
and a description, unknown keys are refused by name, errors name the table and key, secrets never
print, pushed fleet documents meet the same models, and systemd/config.toml is what the models
generate."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from types import NoneType
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import pytest
from msgspec import Meta

from edge_wire import config_reference, settings
from edge_wire.settings import Check, ConfigError, FromTable, Table, arms, hints, load_table, meta, split
from proxy.auth.keys import hash_key
from proxy.config import ProxyConfig, proxy_config_from
from proxy.fleet.schema import managed, validate
from proxy.mqtt import mqtt_config_from
from proxy.offload import DevicesConfig, OffloadConfig, cloud_config_from

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "config.toml"
REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_BOUNDS = ("gt", "ge", "lt", "le", "min_length", "max_length", "pattern")


def config_models() -> set[type[Table]]:
    """Every Table of the config modules: the top-level tables and the ones nested in them."""
    top = [model for _, model in settings.example_models()]
    found: set[type[Table]] = set()

    def visit(cls: type) -> None:
        for sub in cls.__subclasses__():
            found.add(sub)
            visit(sub)

    visit(Table)
    modules = {m.__module__ for m in top} | {"proxy.jwt_config", "proxy.core.ratelimit"}
    return {m for m in found if m.__module__ in modules}


def problems(model: type[Table]) -> list[str]:
    """`Model.field: why` for each field without a description or without a rule."""
    found = []
    for name, tp in hints(model).items():
        if not meta(split(tp)[1]).description:
            found.append(f"{model.__name__}.{name}: no description")
        if not has_rule(tp):
            found.append(f"{model.__name__}.{name}: no rule")
    return found


def has_rule(tp: Any) -> bool:
    """A bound in a Meta, a Literal, a bool, a Check, a nested Table (its fields have rules), a
    field filled from another table, or a union or container whose members all have one."""
    base, extras = split(tp)
    rule = meta(extras)
    if any(isinstance(e, (Check, FromTable)) for e in extras) or any(getattr(rule, a) is not None for a in _BOUNDS):
        return True
    members = [a for a in arms(base) if a is not NoneType]
    if len(members) > 1:
        return all(has_rule(a) for a in members)
    (only,) = members
    inner = split(only)[0]
    origin = get_origin(inner) or inner
    if origin in (Literal, bool) or (isinstance(origin, type) and issubclass(origin, Table)):
        return True
    if origin in (tuple, list):
        return has_rule(get_args(inner)[0])
    if origin is dict:
        return has_rule(get_args(inner)[1])  # keys are names (of tiers, categories)
    return only is not base and has_rule(only)


def test_every_config_model_is_found():
    names = {m.__name__ for m in config_models()}
    assert names >= {"EngineConfig", "ProxyConfig", "JwtConfig", "KeySource", "Limits", "SafetyTable", "PolicyTable",
                     "CategoryTable", "TracingConfig", "MqttConfig", "FleetConfig", "OffloadConfig", "DevicesConfig",
                     "CloudConfig"}


def test_every_field_has_a_rule_and_a_description():
    assert [p for model in sorted(config_models(), key=lambda m: m.__name__) for p in problems(model)] == []


def test_the_walk_finds_a_field_without_a_rule():
    class Loose(Table):
        name: Annotated[str, Meta(description="anything goes")] = "x"
        names: tuple[str, ...] = ()
        level: Annotated[Literal["a", "b"], Meta(description="a or b")] = "a"

    assert problems(Loose) == ["Loose.name: no rule", "Loose.names: no description", "Loose.names: no rule"]


# -- unknown keys and messages ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, _ in settings.EXAMPLE_TABLES])
def test_every_table_refuses_unknown_keys_by_name(name):
    model = dict(settings.example_models())[name]
    with pytest.raises(ConfigError, match=rf"^\[{name}\] unknown key 'colour' \(known: .*{sorted(settings.table_keys(model))[0]}"):
        load_table(model, {name: {"colour": 1}}, name, None)


@pytest.mark.parametrize("proxy, message", [
    ({"jwt": {"issuer": "i", "audience": "a", "keys": [{"pem_file": "k", "colour": 1}]}}, "jwt.keys[0]: unknown key 'colour'"),
    ({"rate_limit_tiers": {"gold": {"colour": 1}}}, "rate_limit_tiers.gold: unknown key 'colour'"),
    ({"rate_limit_tiers": {"gold": {"tokens_per_min": -1}}}, "rate_limit_tiers.gold.tokens_per_min: must be >= 0, got -1"),
    ({"safety": {}}, "unknown key 'safety'"),  # [safety] is a table of its own, not a key of [proxy]
])
def test_nested_tables_name_the_key_path(proxy, message):
    with pytest.raises(ConfigError) as info:
        proxy_config_from({"proxy": proxy}, None, environ={})
    assert str(info.value).startswith("[proxy] ") and message in str(info.value)
    with pytest.raises(ConfigError, match=r"\[safety\] categories.x: unknown key 'colour'"):
        proxy_config_from({"safety": {"categories": {"x": {"terms": ["a"], "colour": 1}}}}, None, environ={})


def _bounded(model: type[Table]):
    """(key, lowest valid value, its bound's type info) of each numeric field with a lower bound."""
    for key in settings.table_keys(model):
        base, extras = split(hints(model)[key])
        arm = next(a for a in arms(base) if a is not NoneType)
        info = msgspec.inspect.type_info(Annotated[(arm, *extras)])
        info = info.type if isinstance(info, msgspec.inspect.Metadata) else info
        if isinstance(info, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
            lo = info.ge if info.ge is not None else info.gt
            if lo is not None:
                yield key, lo, info


@pytest.mark.parametrize("name", [name for name, _ in settings.EXAMPLE_TABLES])
def test_out_of_range_and_wrong_type_errors_name_table_and_key(name):
    model = dict(settings.example_models())[name]
    checked = 0
    for key, lo, info in _bounded(model):
        below = lo - 1
        with pytest.raises(ConfigError) as info_below:
            load_table(model, {name: {key: below}}, name, None)
        text = str(info_below.value)
        assert text.startswith(f"[{name}] {key}: must be ") and text.endswith(f", got {below!r}"), text
        bound = f"[{lo:g}, " if info.le is not None and info.ge is not None else f"{'>=' if info.ge is not None else '>'} {lo:g}"
        assert bound in text, text
        with pytest.raises(ConfigError, match=rf"^\[{name}\] {key}: must be (an integer|a number), got 'x'$"):
            load_table(model, {name: {key: "x"}}, name, None)
        checked += 1
    assert checked  # every table has bounded numbers


def test_pushed_documents_meet_the_same_models():
    tables = {"proxy": managed(ProxyConfig()), "offload": managed(OffloadConfig()), "devices": managed(DevicesConfig())}
    pushed = {"proxy": {"rate_limit_requests_per_min": -5, "safety": {}},
              "offload": {"max_wait_s": math.inf, "breaker_failures": 2},
              "devices": {"default_temperature": "hot"}}
    assert validate(pushed, tables) == {
        "proxy.rate_limit_requests_per_min": "must be >= 0, got -5",
        "proxy.safety": "unknown key",
        "offload.max_wait_s": "must be a number, got inf",
        "devices.default_temperature": "must be a number, got 'hot'",
    }
    for table, values in pushed.items():  # the file's loaders say the same of the same values
        key, value = next(iter(values.items()))
        model = type(tables[table].config)
        with pytest.raises(ConfigError, match=f"{key}: " + validate({table: {key: value}}, tables)[f"{table}.{key}"]):
            load_table(model, {table: {key: value}}, table, None)


def test_directly_built_tables_are_checked_too():
    with pytest.raises(ConfigError, match=r"^max_wait_s: must be a number in \[0, 3600\], got -1$"):
        OffloadConfig(max_wait_s=-1)
    with pytest.raises(ConfigError, match=r"^breaker_failures: must be an integer, got 2.5$"):
        msgspec.structs.replace(OffloadConfig(), breaker_failures=2.5)
    assert OffloadConfig(max_wait_s=1).max_wait_s == 1.0 and isinstance(OffloadConfig(max_wait_s=1).max_wait_s, float)


# -- secrets ------------------------------------------------------------------------------------------


def test_secrets_never_print(caplog):
    env = {"EDGE_MQTT_USERNAME": "gw", "EDGE_MQTT_PASSWORD": "hunter2-mqtt", "EDGE_CLOUD_UPSTREAM_API_KEY": "sk-upstream-42",
           "EDGE_PROXY_API_KEYS": "sk-plain-7"}
    configs = [mqtt_config_from({}, None, env), cloud_config_from({}, None, env), proxy_config_from({}, None, env)]
    assert (configs[0].password, configs[1].upstream_api_key) == ("hunter2-mqtt", "sk-upstream-42")
    assert configs[2].api_keys == (hash_key("sk-plain-7"),)
    secrets = ("hunter2", "sk-upstream", "sk-plain", hash_key("sk-plain-7"))
    with caplog.at_level(logging.INFO):
        for config in configs:
            logging.getLogger("test").info("config %s %r", config, config, extra={"config": config})
            shown = f"{config} {config!r} {str(config)}"
            assert "'***'" in shown and not any(s in shown for s in secrets), shown
    assert not any(s in caplog.text for s in secrets)
    assert "url='mqtt://127.0.0.1:1883'" in repr(configs[0])  # the rest is shown as it is
    for data in ({"mqtt": {"username": "u", "password": 12345678}}, {"cloud": {"upstream_api_key": ["sk-in-a-list"]}}):
        with pytest.raises(ConfigError) as info:
            (mqtt_config_from if "mqtt" in data else cloud_config_from)(data, None, {})
        assert "12345678" not in str(info.value) and "sk-in-a-list" not in str(info.value)


# -- the example config -------------------------------------------------------------------------------


def test_example_config_is_generated_from_the_models():
    text = EXAMPLE.read_text(encoding="utf-8")
    assert text == settings.example(settings.intro_of(text)), (
        "systemd/config.toml is out of date: run python -m edge_wire.settings example systemd/config.toml")
    for name, _ in settings.EXAMPLE_TABLES:
        assert f"\n# [{name}]\n" in text
    for model in config_models():  # nested tables too: as keys, or as the headers of their tables
        for key in settings.table_keys(model):
            assert re.search(rf"\n#( |   ){key} = |\.{key}(\.NAME)?\]", text), f"{model.__name__}.{key}"


def test_configuration_reference_is_generated_from_the_models():
    text = REFERENCE.read_text(encoding="utf-8")
    assert text == config_reference.reference(config_reference.intro_of(text)), (
        "docs/configuration.md is out of date: run python -m edge_wire.settings reference docs/configuration.md")
    for name, _ in settings.EXAMPLE_TABLES:
        assert f"\n## `[{name}]`\n" in text
    for model in config_models():  # every key of every table, nested ones included
        for key in settings.table_keys(model):
            assert f"| `{key}` |" in text or re.search(rf"\.{key}(\.NAME)?\]+`", text), f"{model.__name__}.{key}"


def test_the_settings_command_writes_the_reference(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text("# Intro\n\nkept\n\n## `[engine]`\n\nstale\n", encoding="utf-8")
    assert settings.main(["reference", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Intro\n\nkept\n\n## `[engine]`\n") and "stale" not in text and "| `max_batch` |" in text
