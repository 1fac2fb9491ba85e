"""Tool calling and structured output through the sidecar, with the official openai client: the
OpenAI shapes (tool_calls with call_ ids and JSON-string arguments, finish_reason tool_calls,
streamed delta.tool_calls), the round trip with tool results fed back, arguments and JSON
answers that validate on every sampled run, and the 400s for what cannot be honoured."""

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

from agent_harness import PARAMS_BY_NAME, READING_SCHEMA, TOOLS
from proxy.config import ProxyConfig

MODEL = "tiny"
USER = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def engine(agent_model_dir):
    with tempfile.TemporaryDirectory(prefix="et-", dir="/tmp") as d, Engine(agent_model_dir, Path(d) / "e.sock", max_batch=8) as e:
        yield e


@pytest.fixture(scope="module")
def client(engine):
    with Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(MODEL,))) as p:
        yield openai.OpenAI(base_url=f"{p.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMS_BY_NAME[call.function.name])


def test_tool_call_round_trip(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=300)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    history = [*USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"value": 21.5})}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=20, seed=1)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result went into the prompt


def test_streamed_tool_calls_match_the_plain_answer(client):
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", temperature=1.0, seed=11, max_tokens=400)
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:  # the first delta of a call: id, type and name
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.function.name, c.function.arguments) for c in plain]


def test_required_arguments_validate_on_fifty_sampled_runs(client):
    def one(seed: int):
        return client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=300)

    with ThreadPoolExecutor(8) as pool:  # concurrent: the engine batches them
        answers = list(pool.map(one, range(50)))
    for r in answers:
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls)
    assert {r.choices[0].message.tool_calls[0].function.name for r in answers} == {"read_sensor", "set_valve"}


def test_named_tool_choice_and_parallel_calls(client):
    named = {"type": "function", "function": {"name": "set_valve"}}
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, temperature=1.0,
                                           seed=seed, max_tokens=600)
        calls = r.choices[0].message.tool_calls
        _check_calls(calls)
        assert {c.function.name for c in calls} == {"set_valve"} and len(calls) <= 8
        assert len({c.id for c in calls}) == len(calls)


def test_auto_answers_text_or_valid_calls(client):
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                _check_calls(choice.message.tool_calls)
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


def test_json_schema_answer_validates_on_every_run(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "reading", "schema": READING_SCHEMA, "strict": True}}

    def one(seed: int):
        return client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, temperature=1.0,
                                              seed=seed, max_tokens=200)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    for r in answers:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), READING_SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=USER, response_format=fmt, temperature=1.0, seed=3, max_tokens=200, stream=True) if c.choices)
    assert streamed == answers[3].choices[0].message.content


@pytest.mark.parametrize("kw, param, words", [
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tools=TOOLS, response_format={"type": "json_object"}), "response_format", "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "uniqueItems": True}}}}}]), "tools[0].function.parameters", "uniqueItems"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}),
     "response_format", "not"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}, "extra": 1}), "response_format.json_schema", None),
    (dict(tools=[{"type": "code_interpreter"}]), "tools[0].type", "not supported"),
    (dict(functions=[{"name": "f"}]), "functions", "tools"),
    (dict(messages=[*USER, {"role": "tool", "content": "21"}]), "messages[1].tool_call_id", "required"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0].tool_calls", "assistant"),
])
def test_what_cannot_be_honoured_is_refused(client, kw, param, words):
    args = {"model": MODEL, "messages": USER, "max_tokens": 5, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    error = info.value.body
    assert error["param"] == param, error
    assert words is None or words in error["message"], error
