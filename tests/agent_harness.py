"""Shared by the tool-calling, grammar and safety tests (which run on conftest's
`agent_model_dir`, the tiny random model with a 2048-token context): the tools and schemas they
constrain it with. Its output is random, so its tool calls are nonsense but grammar-valid: what
the mechanics tests need."""

from __future__ import annotations

# Bounded values only: a random model in an unbounded string would run to max_tokens.
SENSOR_PARAMS = {
    "type": "object",
    "properties": {
        "sensor": {"type": "string", "enum": ["temperature", "humidity", "pressure"]},
        "room": {"type": "string", "maxLength": 8},
        "samples": {"type": "integer", "minimum": 1, "maximum": 10},
        "celsius": {"type": "boolean"},
    },
    "required": ["sensor", "room"],
    "additionalProperties": False,
}
VALVE_PARAMS = {
    "type": "object",
    "properties": {"valve": {"type": "integer", "minimum": 0, "maximum": 7}, "open": {"type": "boolean"}},
    "required": ["valve", "open"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "read_sensor", "description": "Read a sensor in a room", "parameters": SENSOR_PARAMS}},
    {"type": "function", "function": {"name": "set_valve", "description": "Open or close a valve", "parameters": VALVE_PARAMS}},
]
PARAMS_BY_NAME = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
READING_SCHEMA = {
    "type": "object",
    "properties": {
        "room": {"type": "string", "maxLength": 6},
        "level": {"enum": ["low", "mid", "high"]},
        "ok": {"type": "boolean"},
        "values": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99}, "maxItems": 3},
    },
    "required": ["room", "level", "ok"],
    "additionalProperties": False,
}

