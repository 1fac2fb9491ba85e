"""Constrained decoding in the engine, over its socket: output follows the grammar on every
sampled run, batched constrained and unconstrained requests equal their single runs (with the
prefix cache on), and bad or unsupported grammars are refused naming the field and the feature."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import jsonschema
import pytest
from engine_harness import Engine

from agent_harness import PARAMS_BY_NAME, READING_SCHEMA, TOOLS
from edge_runtime.client import EngineClient, EngineError

USER = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def engine(agent_model_dir):
    with tempfile.TemporaryDirectory(prefix="eg-", dir="/tmp") as d, \
            Engine(agent_model_dir, Path(d) / "e.sock", max_batch=8, prefix_cache_bytes=8 << 20) as e:
        yield e


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _generate(client: EngineClient, **kw) -> tuple[str, list[dict], dict]:
    frames = [f async for f in client.generate(**kw)]
    tokens = [f for f in frames if f["type"] == "token"]
    return "".join(f["text"] for f in tokens), tokens, frames[-1]


def _all(engine: Engine, requests: list[dict], concurrently: bool) -> list[tuple[str, list[dict], dict]]:
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            if concurrently:
                return await asyncio.gather(*(_generate(client, **r) for r in requests))
            return [await _generate(client, **r) for r in requests]

    return run(main())


def test_json_schema_output_validates_on_every_sampled_run(engine):
    grammar = {"type": "json_schema", "schema": READING_SCHEMA}
    requests = [dict(messages=USER, params={"temperature": 1.0, "seed": seed, "max_tokens": 200}, grammar=grammar)
                for seed in range(24)]
    results = _all(engine, requests, concurrently=True)
    for text, _, done in results:
        assert done["finish_reason"] == "stop", text
        jsonschema.validate(json.loads(text), READING_SCHEMA)
    assert len({text for text, _, _ in results}) > 1  # sampled, not forced


def test_penalties_stay_inside_the_mask(engine):
    grammar = {"type": "json_schema", "schema": READING_SCHEMA}
    params = {"temperature": 0.7, "seed": 3, "max_tokens": 200, "repetition_penalty": 3.0, "presence_penalty": 2.0,
              "frequency_penalty": 2.0, "top_k": 5, "top_p": 0.9}
    ((text, _, done),) = _all(engine, [dict(messages=USER, params=params, grammar=grammar)], concurrently=False)
    assert done["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), READING_SCHEMA)


def test_tool_call_grammar_yields_calls_that_validate(engine):
    grammar = {"type": "tool_calls", "mode": "required", "parallel": True}
    requests = [dict(messages=USER, tools=TOOLS, params={"temperature": 1.0, "seed": s, "max_tokens": 400}, grammar=grammar)
                for s in range(8)]
    for text, tokens, done in _all(engine, requests, concurrently=True):
        assert done["finish_reason"] == "tool_calls" and text == ""
        calls: dict[int, dict] = {}
        for delta in (d for t in tokens for d in t.get("tool_calls", [])):
            call = calls.setdefault(delta["index"], {"name": delta.get("name"), "arguments": ""})
            call["arguments"] += delta.get("arguments", "")
        assert 1 <= len(calls) <= 8
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), PARAMS_BY_NAME[call["name"]])


def test_batched_constrained_and_plain_requests_equal_their_single_runs(engine):
    greedy = {"temperature": 0.0, "max_tokens": 40}
    requests = [
        dict(messages=USER, params=greedy, grammar={"type": "json_schema", "schema": READING_SCHEMA}),
        dict(messages=USER, params=greedy),
        dict(messages=USER, tools=TOOLS, params=greedy, grammar={"type": "tool_calls", "mode": "required", "parallel": False}),
        dict(prompt="the lazy dog", params=greedy),
        dict(messages=[{"role": "user", "content": "hello world"}], params=greedy, grammar={"type": "json_schema", "schema": READING_SCHEMA}),
        dict(messages=USER, tools=TOOLS, params=greedy, grammar={"type": "tool_calls", "mode": "auto"}),
    ]
    alone = _all(engine, requests, concurrently=False)
    together = _all(engine, requests, concurrently=True)  # the prompts' prefixes are cached by now
    for (_, single, _), (_, batched, _) in zip(alone, together):
        assert [t["token_id"] for t in batched] == [t["token_id"] for t in single]
    assert engine.scheduler.prefix_cache.stats()["hits"] > 0


@pytest.mark.parametrize("fields, param, words", [
    (dict(grammar={"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}), "grammar.schema", "uniqueItems"),
    (dict(grammar={"type": "json_schema", "schema": {"type": "string", "pattern": "(?=a)b"}}), "grammar.schema", "look-around"),
    (dict(tools=[TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
          grammar={"type": "tool_calls"}), "tools[1].function.parameters", "not"),
    (dict(grammar={"type": "tool_calls"}), "grammar", "needs tools"),
    (dict(grammar={"type": "json_object"}, params={"ignore_eos": True}), "params.ignore_eos", "grammar"),
    (dict(tools=TOOLS, grammar={"type": "tool_calls", "names": ["nope"]}), "grammar.names", "nope"),
])
def test_bad_grammar_is_refused_naming_the_feature(engine, fields, param, words):
    with pytest.raises(EngineError) as info:
        _all(engine, [dict(messages=USER, **fields)], concurrently=False)
    assert info.value.code == "invalid_request" and info.value.param == param
    assert words in info.value.message


def test_tools_need_messages(engine):
    with pytest.raises(EngineError) as info:
        _all(engine, [dict(prompt="x", tools=TOOLS)], concurrently=False)
    assert info.value.param == "tools"


def test_models_answer_names_the_tool_format(engine):
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            return await client.models()

    assert run(main())[0]["tools"] == {"format": "hermes", "template": False}
