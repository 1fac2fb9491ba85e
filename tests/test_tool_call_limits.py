"""What a client receives as tool calls (docs/tool-calling.md, "What a client receives"): only
complete calls whose arguments are a JSON object; a call cut off by max_tokens is never returned
(finish_reason "length"); an exact repeat of a call in the same answer ends the answer in the
engine and is dropped by the sidecar. The assembler directly, then the engine over its socket and
the sidecar over HTTP with the official openai client, on the tiny random model."""

from __future__ import annotations

import asyncio
import json
import tempfile
import urllib.request
from pathlib import Path

import jsonschema
import openai
import pytest
from engine_harness import Engine
from proxy_harness import Proxy

from agent_harness import PARAMS_BY_NAME, TOOLS
from edge_runtime.client import EngineClient
from proxy.config import ProxyConfig
from proxy.core.tool_calls import DUPLICATE, INVALID, TRUNCATED, ToolCalls

MODEL = "tiny"
USER = [{"role": "user", "content": "the quick brown fox"}]
# A function without arguments: every call of it is `{}`, so a second call is an exact repeat.
PING = [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}}]


# -- the assembler --------------------------------------------------------------------


def test_a_call_is_released_whole_once_its_arguments_are_complete():
    calls = ToolCalls()
    assert calls.add([{"index": 0, "name": "set_valve", "arguments": '{"valve": '}]) == []
    assert calls.add([{"index": 0, "arguments": "3, "}]) == []
    (entry,) = calls.add([{"index": 0, "arguments": '"open": true}'}])
    assert entry["index"] == 0 and entry["id"].startswith("call_") and entry["type"] == "function"
    assert entry["function"] == {"name": "set_valve", "arguments": '{"valve": 3, "open": true}'}
    assert calls.calls == [{k: v for k, v in entry.items() if k != "index"}]
    calls.end("tool_calls")
    assert not calls.dropped


def test_a_call_cut_off_by_the_token_limit_is_dropped_as_truncated():
    calls = ToolCalls()
    calls.add([{"index": 0, "name": "ping", "arguments": "{}"}])
    assert calls.add([{"index": 1, "name": "set_valve", "arguments": '{"valve": 3, "op'}]) == []
    calls.end("length")
    assert [c["function"]["name"] for c in calls.calls] == ["ping"]
    assert calls.dropped == {TRUNCATED: 1}


def test_exact_repeats_are_dropped_and_the_rest_renumbered():
    calls = ToolCalls()
    out = calls.add([{"index": 0, "name": "set_valve", "arguments": '{"valve": 1, "open": true}'},
                     {"index": 1, "name": "set_valve", "arguments": '{"open":true,"valve":1}'},  # equal as JSON
                     {"index": 2, "name": "set_valve", "arguments": '{"valve": 2, "open": true}'},
                     {"index": 3, "name": "read_sensor", "arguments": '{"valve": 1, "open": true}'}])  # another name
    assert [(e["index"], json.loads(e["function"]["arguments"])["valve"]) for e in out] == [(0, 1), (1, 2), (2, 1)]
    assert calls.dropped == {DUPLICATE: 1}
    assert len({c["id"] for c in calls.calls}) == 3


def test_arguments_that_are_not_an_object_are_dropped_and_late_fragments_ignored():
    calls = ToolCalls()
    assert calls.add([{"index": 0, "name": "f", "arguments": "[1, {}]"}]) == []  # complete JSON, not an object
    assert calls.add([{"index": 1, "name": "g", "arguments": '{"a": "}"'}]) == []  # a brace inside a string
    (entry,) = calls.add([{"index": 1, "arguments": "}"}])
    assert calls.add([{"index": 1, "arguments": "}"}]) == []  # past the object's end: not part of it
    assert json.loads(entry["function"]["arguments"]) == {"a": "}"}
    calls.end("stop")
    assert calls.dropped == {INVALID: 1}


# -- the engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(agent_model_dir):
    with tempfile.TemporaryDirectory(prefix="el-", dir="/tmp") as d, Engine(agent_model_dir, Path(d) / "e.sock", max_batch=8) as e:
        yield e


def test_the_engine_ends_an_answer_at_the_first_repeated_call(engine):
    grammar = {"type": "tool_calls", "mode": "required", "parallel": True}

    async def one(client: EngineClient, seed: int) -> tuple[list[dict], dict]:
        frames = [f async for f in client.generate(messages=USER, tools=PING, grammar=grammar,
                                                   params={"temperature": 1.0, "seed": seed, "max_tokens": 300})]
        return [d for f in frames[:-1] for d in f.get("tool_calls", [])], frames[-1]

    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            return await asyncio.gather(*(one(client, s) for s in range(8)))

    answers = asyncio.run(asyncio.wait_for(main(), 120))
    for deltas, done in answers:
        assert done["finish_reason"] == "tool_calls"
        assert {d["index"] for d in deltas} <= {0, 1}  # the first call, and at most its one repeat
    assert any(d["index"] == 1 for deltas, _ in answers for d in deltas)  # the rule was met at least once


# -- the sidecar over HTTP -------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(engine):
    with Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(MODEL,))) as p:
        yield p


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_call_cut_off_by_max_tokens_is_not_returned(client, proxy):
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0)
    whole = client.chat.completions.create(**kw, max_tokens=300)
    assert whole.choices[0].finish_reason == "tool_calls"
    (call,) = whole.choices[0].message.tool_calls
    cut = []  # greedy: each shorter answer is a prefix of the whole one
    for max_tokens in range(1, whole.usage.completion_tokens):
        choice = client.chat.completions.create(**kw, max_tokens=max_tokens).choices[0]
        assert choice.finish_reason == "length"
        if not choice.message.tool_calls:
            cut.append(max_tokens)
        else:  # only once the arguments are whole (the closing tag may still be missing)
            assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
                [(call.function.name, call.function.arguments)]
    assert cut == list(range(1, cut[-1] + 1))
    again = client.chat.completions.with_raw_response.create(**kw, max_tokens=cut[-1] + 1)
    assert again.headers["x-served-by"] == "local"  # not replayed from the cache, which would lose the call
    assert [c.function.arguments for c in again.parse().choices[0].message.tool_calls] == [call.function.arguments]
    chunks = list(client.chat.completions.create(**kw, max_tokens=cut[-1], stream=True))
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert 'edge_proxy_tool_calls_dropped_total{reason="truncated"}' in _scrape(proxy)


def test_every_returned_call_is_complete_whatever_the_token_limit(client):
    for max_tokens in range(4, 60, 5):
        for seed in range(2):
            choice = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                    temperature=1.0, seed=seed, max_tokens=max_tokens).choices[0]
            assert choice.finish_reason in ("tool_calls", "length")
            assert choice.finish_reason == "length" or choice.message.tool_calls
            for call in choice.message.tool_calls or []:
                jsonschema.validate(json.loads(call.function.arguments), PARAMS_BY_NAME[call.function.name])


def test_parallel_calls_return_no_repeats(client, proxy):
    for seed in range(6):
        for stream in (False, True):
            kw = dict(model=MODEL, messages=USER, tools=PING, tool_choice="required", temperature=1.0, seed=seed,
                      max_tokens=300)
            if stream:
                entries = [e for c in client.chat.completions.create(**kw, stream=True) if c.choices
                           for e in c.choices[0].delta.tool_calls or []]
                assert [(e.index, e.function.name, e.function.arguments) for e in entries] == [(0, "ping", "{}")]
            else:
                choice = client.chat.completions.create(**kw).choices[0]
                assert choice.finish_reason == "tool_calls"
                assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [("ping", "{}")]
    assert 'edge_proxy_tool_calls_dropped_total{reason="duplicate"}' in _scrape(proxy)


def _scrape(proxy: Proxy) -> str:
    with urllib.request.urlopen(f"{proxy.url}/metrics", timeout=10) as answer:
        return answer.read().decode()
