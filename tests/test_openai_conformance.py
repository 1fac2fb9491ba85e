"""The sidecar's responses validate against OpenAI's own published OpenAPI description (the
`openai/openai-openapi` repository; the schemas used are extracted, verbatim, into
tests/data/openai_openapi_subset.json by tests/data/extract_openai_schemas.py): chat completions
(plain, with logprobs, with tool calls), every chunk of streamed chats and completions,
completions, the model list and model objects, and error bodies. The real sidecar and engine,
on the tiny model with room for tool prompts (test_tools_api's fixtures), over raw HTTP so that
every byte the client gets is what is checked."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from agent_harness import TOOLS
from proxy.auth.keys import hash_key
from test_proxy_api import _proxy, _sse, http
from test_tools_api import MODEL, USER, client, engine  # noqa: F401 (fixtures: the sidecar over the tiny agent model)

SUBSET = json.loads((Path(__file__).parent / "data" / "openai_openapi_subset.json").read_text())


def _nullable(node: Any) -> Any:
    """The description is OpenAPI 3.1 (JSON Schema 2020-12) but a few fields still carry 3.0's
    `nullable: true`, which 2020-12 ignores; read it as OpenAI means it: null, or the schema."""
    if isinstance(node, list):
        return [_nullable(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.get("nullable") is True:
        del node["nullable"]
        return {"anyOf": [{"type": "null"}, node]}
    return node


DOCUMENT = _nullable(SUBSET)
SCHEMAS = DOCUMENT["components"]["schemas"]
# The spec says a streamed completion chunk has the shape of CreateCompletionResponse, whose
# finish_reason is a non-null enum; a chunk before the last cannot know it yet, and OpenAI's own
# stream sends null there. So only those chunks may carry null, and the last chunk with a choice
# must validate against the unchanged schema (test_streamed_completion_chunks_conform).
SCHEMAS["CompletionChunkBeforeTheLast"] = chunk = copy.deepcopy(SCHEMAS["CreateCompletionResponse"])
_finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [{"type": "null"}, _finish]}


def _problems(error: ValidationError) -> list[str]:
    """Each failed rule as `path: message (rule)`, descending into anyOf/oneOf branches; a value
    failing the null branch of a nullable field says nothing, so that branch is left out."""
    if error.context:
        return [line for sub in error.context if not (sub.validator == "type" and sub.validator_value == "null")
                for line in _problems(sub)]
    path = "/".join(str(p) for p in error.absolute_path) or "(body)"
    return [f"{path}: {error.message[:200]} ({error.validator})"]


def violations(schema: str, body: Any) -> list[str]:
    # The components document itself is the root, so `#/components/schemas/...` resolves in it.
    validator = Draft202012Validator({**DOCUMENT, "$ref": f"#/components/schemas/{schema}"})
    return list(dict.fromkeys(line for error in validator.iter_errors(body) for line in _problems(error)))


def conforms(schema: str, *bodies: Any) -> None:
    """Every body validates; the message lists every failed rule of every body (chunk k: ...)."""
    problems = [f"{k}: {line}" if len(bodies) > 1 else line for k, body in enumerate(bodies) for line in violations(schema, body)]
    assert not problems, f"{schema}:\n  " + "\n  ".join(problems)


@pytest.fixture(scope="module")
def v1(client) -> str:
    return str(client.base_url).rstrip("/")


def _post(url: str, body: dict[str, Any]) -> bytes:
    status, _, answer = http("POST", url, json=body)
    assert status == 200, answer
    return answer


CALL = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0}


@pytest.mark.parametrize("extra, check", [
    ({}, lambda choice: isinstance(choice["message"]["content"], str)),
    ({"logprobs": True}, lambda choice: len(choice["logprobs"]["content"]) > 0),
    (CALL, lambda choice: choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1),
], ids=["plain", "logprobs", "tool_calls"])
def test_chat_completion_conforms(v1, extra, check):
    body = json.loads(_post(f"{v1}/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 300, "seed": 1, **extra}))
    assert check(body["choices"][0])  # the case is what it claims to be
    conforms("CreateChatCompletionResponse", body)


@pytest.mark.parametrize("extra, carries", [({}, "content"), ({"logprobs": True}, "logprobs"), (CALL, "tool_calls")],
                         ids=["plain", "logprobs", "tool_calls"])
def test_streamed_chat_chunks_conform(v1, extra, carries):
    events = _sse(_post(f"{v1}/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 300, "seed": 1, "stream": True,
                                                    "stream_options": {"include_usage": True}, **extra}))
    *chunks, done = events
    assert done == "[DONE]" and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert any(choice.get(carries) or choice["delta"].get(carries) for choice in choices)  # the case is what it claims to be
    conforms("CreateChatCompletionStreamResponse", *chunks)


@pytest.mark.parametrize("extra", [{}, {"logprobs": 0}], ids=["plain", "logprobs"])
def test_completion_conforms(v1, extra):
    body = json.loads(_post(f"{v1}/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 8, "seed": 1, **extra}))
    assert isinstance(body["choices"][0]["text"], str)
    conforms("CreateCompletionResponse", body)


def test_streamed_completion_chunks_conform(v1):
    events = _sse(_post(f"{v1}/completions", {"model": MODEL, "prompt": "the lazy dog", "max_tokens": 8, "seed": 1, "stream": True,
                                              "stream_options": {"include_usage": True}}))
    *chunks, last, usage, done = events
    assert done == "[DONE]" and usage["choices"] == [] and last["choices"][0]["finish_reason"] in ("stop", "length")
    conforms("CompletionChunkBeforeTheLast", *chunks)
    conforms("CreateCompletionResponse", last, usage)


def test_models_conform(v1):
    status, _, body = http("GET", f"{v1}/models")
    models = json.loads(body)
    assert status == 200 and MODEL in [m["id"] for m in models["data"]]
    conforms("ListModelsResponse", models)
    for model in models["data"]:
        status, _, body = http("GET", f"{v1}/models/{model['id']}")
        assert status == 200
        conforms("Model", json.loads(body))


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/chat/completions", {"model": MODEL, "messages": USER, "temperature": 3}, 400),
    ("POST", "/completions", {"model": MODEL, "prompt": "hi", "best_of": 2}, 400),
    ("POST", "/chat/completions", {"model": "gpt-9", "messages": USER}, 404),
    ("GET", "/models/gpt-9", None, 404),
    ("GET", "/nothing", None, 404),
])
def test_error_bodies_conform(v1, method, path, body, status):
    answer = http(method, f"{v1}{path}", json=body)
    assert answer[0] == status, answer
    conforms("ErrorResponse", json.loads(answer[2]))


def test_unauthorized_body_conforms(engine):
    with _proxy(engine, api_keys=(hash_key("sk-right"),)) as p:
        for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": USER}), ("/v1/models", None)):
            status, headers, answer = http("POST" if body else "GET", f"{p.url}{path}", json=body,
                                           headers={"Authorization": "Bearer sk-wrong"})
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            conforms("ErrorResponse", json.loads(answer))
