"""Constrained decoding on the default model (a 49,152-token vocabulary, a real chat template
without tool support): JSON answers and tool calls through the sidecar parse and validate on
sampled runs, and its answer to a plain question is sensible."""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from engine_harness import Engine
from proxy_harness import Proxy

from edge_runtime.builder.build import BuildOptions, build
from proxy.config import ProxyConfig

pytestmark = pytest.mark.slow
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                   "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
SENSOR = {"type": "function", "function": {
    "name": "read_sensor", "description": "Read the current value of a sensor in a room",
    "parameters": {"type": "object", "properties": {"sensor": {"type": "string", "enum": ["temperature", "humidity"]},
                                                    "room": {"type": "string", "maxLength": 30}},
                   "required": ["sensor", "room"], "additionalProperties": False},
}}


@pytest.fixture(scope="module")
def client(smollm_gguf, tmp_path_factory):
    model_dir = build(smollm_gguf, tmp_path_factory.mktemp("m") / "int8", BuildOptions(max_context=1024), quiet=True)
    with tempfile.TemporaryDirectory(prefix="ed-", dir="/tmp") as d, Engine(model_dir, Path(d) / "e.sock", max_batch=4) as e, \
            Proxy(ProxyConfig(engine_socket=str(e.socket_path))) as p:
        yield openai.OpenAI(base_url=f"{p.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_and_json_object_answers_parse(client):
    messages = [{"role": "user", "content": "Name a large city, its country and its population in millions, as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}

    def one(seed: int):
        return client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, response_format=fmt,
                                              temperature=1.0, seed=seed, max_tokens=80)

    with ThreadPoolExecutor(4) as pool:
        for r in pool.map(one, range(4)):
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0, max_tokens=120,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_round_trip_gives_a_sensible_answer(client):
    messages = [{"role": "user", "content": "What is the temperature in the kitchen?"}]
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, tools=[SENSOR],
                                           tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"sensor": "temperature", "room": "kitchen"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"value": 21.5, "unit": "C"})}]
    final = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, tools=[SENSOR],
                                           tool_choice="none", temperature=0, max_tokens=60)
    assert "21.5" in final.choices[0].message.content
