"""The sidecar end to end: the real engine daemon (in-process, on a tiny model) behind the real
sidecar on a free port, driven by the official `openai` client and by raw HTTP (aiohttp)."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from engine_harness import Engine
from multidict import CIMultiDict
from proxy_harness import Proxy

from edge_runtime.client import EngineClient
from proxy.auth.keys import hash_key
from proxy.config import ProxyConfig

ALIAS = "tiny"
USER = [{"role": "user", "content": "the quick brown fox"}]
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}  # about 1 s on the slow engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="ep-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture(scope="module")
def proxy(engine):
    config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(ALIAS,), max_prompt_chars=4000)
    with Proxy(config) as p:
        yield p


@pytest.fixture(scope="module")
def slow_engine(tiny_model_dir):
    """One slot, one queue place, 5 ms per forward."""
    with tempfile.TemporaryDirectory(prefix="ep-", dir="/tmp") as d, \
            Engine(tiny_model_dir, Path(d) / "slow.sock", max_batch=1, queue_size=1, delay_s=0.005) as e:
        yield e


def _proxy(engine: Engine, **config) -> Proxy:
    return Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(ALIAS,), **config))


def _openai(proxy: Proxy, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0, timeout=30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _request(method: str, url: str, **kw) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kw) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def http(method: str, url: str, **kw) -> tuple[int, CIMultiDict, bytes]:
    return run(_request(method, url, **kw))


def _engine_call(engine: Engine, method: str, **kw):
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            if method == "generate":
                return [f async for f in client.generate(**kw)]
            return await getattr(client, method)()

    return run(main())


def _wait_idle(engine: Engine) -> dict:
    for _ in range(300):
        status = _engine_call(engine, "status")
        if status["running"] == 0 and status["queue_depth"] == 0:
            return status
        time.sleep(0.02)
    raise AssertionError(f"engine never went idle: {status}")


def _sse(body: bytes) -> list:
    """The data events of an SSE body: parsed JSON, or the string "[DONE]"."""
    events = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert block == "", block
    return events


def _error(status_body: tuple[int, CIMultiDict, bytes]) -> dict:
    status, headers, body = status_body
    assert headers["Content-Type"].startswith("application/json")
    assert headers["x-request-id"] and headers["x-served-by"] == "local"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------------------------------------- the openai client


def test_openai_client_chat_and_completions_match_the_engine(proxy, engine):
    client = _openai(proxy)
    direct = _engine_call(engine, "generate", messages=USER, params={"max_tokens": 12, "temperature": 0})
    chat = client.chat.completions.create(model=ALIAS, messages=USER, max_tokens=12, temperature=0)
    model_id = engine.server.model_info["id"]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == model_id
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "".join(f.get("text", "") for f in direct)
    assert chat.choices[0].finish_reason == direct[-1]["finish_reason"]
    assert chat.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == direct[-1]["usage"]

    direct = _engine_call(engine, "generate", prompt="hello world", params={"max_tokens": 10, "temperature": 0})
    completion = client.completions.create(model=model_id, prompt="hello world", max_tokens=10, temperature=0)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "".join(f.get("text", "") for f in direct)
    assert completion.usage.completion_tokens == direct[-1]["usage"]["completion_tokens"]

    sampled = client.chat.completions.create(model=ALIAS, messages=USER, max_completion_tokens=6, temperature=0.9,
                                             top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, stop=["\n"])
    assert sampled.usage.completion_tokens <= 6


def test_openai_client_streams_with_usage_last(proxy, engine):
    client = _openai(proxy)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "edge runtimes"}]
    direct = _engine_call(engine, "generate", messages=messages, params={"max_tokens": 16, "temperature": 0})
    chunks = list(client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(f.get("text", "") for f in direct)
    *body, finish, usage = chunks
    assert all(c.usage is None and c.object == "chat.completion.chunk" for c in body + [finish])
    assert finish.choices[0].finish_reason == direct[-1]["finish_reason"]
    assert usage.choices == [] and usage.usage.total_tokens == direct[-1]["usage"]["total_tokens"]
    assert len({c.id for c in chunks}) == 1

    chunks = list(client.completions.create(model=ALIAS, prompt="the lazy dog", max_tokens=8, temperature=0.7, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and all(c.usage is None for c in chunks)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_logprobs(proxy, engine):
    client = _openai(proxy)
    direct = _engine_call(engine, "generate", messages=USER, params={"max_tokens": 8, "temperature": 0, "logprobs": True})
    tokens = [(f["text"], f["logprob"]) for f in direct if f["type"] == "token"]
    chat = client.chat.completions.create(model=ALIAS, messages=USER, max_tokens=8, temperature=0, logprobs=True)
    assert [(e.token, e.logprob) for e in chat.choices[0].logprobs.content] == tokens
    chunks = list(client.chat.completions.create(model=ALIAS, messages=USER, max_tokens=8, temperature=0.5, seed=1,
                                                 logprobs=True, stream=True))
    assert all(isinstance(e.logprob, float) for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content)
    completion = client.completions.create(model=ALIAS, prompt="hello world", max_tokens=8, temperature=0, logprobs=0)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text and len(logprobs.token_logprobs) == len(logprobs.tokens)
    assert logprobs.text_offset[0] == 0


def test_models(proxy, engine):
    client = _openai(proxy)
    model_id = engine.server.model_info["id"]
    assert [m.id for m in client.models.list()] == [model_id, ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_request_ids_and_served_by(proxy):
    status, headers, _ = http("GET", f"{proxy.url}/healthz", headers={"x-request-id": "trace-42.a:b"})
    assert status == 200 and headers["x-request-id"] == "trace-42.a:b" and headers["x-served-by"] == "local"
    _, headers, _ = http("GET", f"{proxy.url}/healthz", headers={"x-request-id": "bad id\u00e9" * 40})
    assert len(headers["x-request-id"]) == 32 and " " not in headers["x-request-id"]


# ---------------------------------------------------------------------------------------------- cache


def test_cache_answers_repeats_without_the_engine(proxy, engine):
    url = f"{proxy.url}/v1/chat/completions"
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10, "temperature": 0}
    status, headers, first = http("POST", url, json=body)
    assert status == 200 and headers["x-served-by"] == "local"
    completed = _engine_call(engine, "status")["completed"]

    status, headers, again = http("POST", url, json={**body, "user": "someone else"})
    assert status == 200 and headers["x-served-by"] == "cache"
    first, again = json.loads(first), json.loads(again)
    assert again["choices"] == first["choices"] and again["usage"] == first["usage"] and again["id"] != first["id"]

    status, headers, streamed = http("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    events = _sse(streamed)
    assert status == 200 and headers["x-served-by"] == "cache" and headers["Content-Type"] == "text/event-stream"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == first["choices"][0]["message"]["content"]
    assert events[-2]["usage"] == first["usage"] and events[-1] == "[DONE]"
    assert _engine_call(engine, "status")["completed"] == completed  # the engine did no work for the repeats

    # A fixed seed makes sampling deterministic too; without one nothing is cached.
    seeded = {**body, "temperature": 0.8, "seed": 11}
    assert [http("POST", url, json=seeded)[1]["x-served-by"] for _ in range(2)] == ["local", "cache"]
    sampled = {**body, "temperature": 0.8}
    assert [http("POST", url, json=sampled)[1]["x-served-by"] for _ in range(2)] == ["local", "local"]
    metrics = http("GET", f"{proxy.url}/metrics")[2].decode()
    assert _metric(metrics, "edge_proxy_cache_hits_total") >= 3 and _metric(metrics, "edge_proxy_cache_entries") >= 2


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


# ---------------------------------------------------------------------------------------------- errors


CHAT = {"model": ALIAS, "messages": USER, "max_tokens": 4}


@pytest.mark.parametrize(
    "kw, status, param, code",
    [
        ({"json": {**CHAT, "n": 2}}, 400, "n", "unsupported_parameter"),
        ({"json": {**CHAT, "tools": [{"type": "code_interpreter"}]}}, 400, "tools[0].type", "unsupported_parameter"),
        ({"json": {**CHAT, "response_format": {"type": "grammar"}}}, 400, "response_format", "unsupported_parameter"),
        ({"json": {**CHAT, "logit_bias": {"50": 10}}}, 400, "logit_bias", "unsupported_parameter"),
        ({"json": {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}}, 400, "messages[0].role", "invalid_value"),
        ({"json": {**CHAT, "temperature": 3}}, 400, "temperature", "invalid_value"),
        ({"json": {**CHAT, "best_of": 2}}, 400, "best_of", "unknown_parameter"),
        ({"json": {"messages": USER}}, 400, "model", "missing_required_parameter"),
        ({"json": [1, 2]}, 400, None, "invalid_json"),
        ({"data": b'{"model": ', "headers": {"Content-Type": "application/json"}}, 400, None, "invalid_json"),
        ({"json": {**CHAT, "messages": [{"role": "user", "content": "x" * 4001}]}}, 400, "messages", "prompt_too_long"),
        ({"json": {**CHAT, "messages": [{"role": "user", "content": "hello " * 400}]}}, 400, "messages", "context_length_exceeded"),
        ({"json": {**CHAT, "model": "gpt-9"}}, 404, "model", "model_not_found"),
        ({"data": b"{}", "headers": {"Content-Type": "text/plain"}}, 415, None, "unsupported_media_type"),
        ({"data": b" " * ((1 << 20) + 1), "headers": {"Content-Type": "application/json"}}, 413, None, "request_too_large"),
    ],
)
def test_errors_have_the_openai_body_and_status(proxy, kw, status, param, code):
    answer = http("POST", f"{proxy.url}/v1/chat/completions", **kw)
    assert answer[0] == status, answer
    error = _error(answer)
    assert (error["param"], error["code"]) == (param, code)


def test_completion_errors_name_the_prompt(proxy):
    url = f"{proxy.url}/v1/completions"
    error = _error(http("POST", url, json={"model": ALIAS, "prompt": "hello " * 400}))
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    error = _error(http("POST", url, json={"model": ALIAS, "prompt": [10**6]}))
    assert error["param"] == "prompt" and "token ids" in error["message"]
    error = _error(http("POST", url, json={"model": ALIAS, "prompt": "hi", "stop": ["x"] * 17}))
    assert error["param"] == "stop"


def test_unknown_route_and_wrong_method(proxy):
    answer = http("GET", f"{proxy.url}/v1/nothing")
    assert answer[0] == 404 and _error(answer)["code"] == "not_found"
    answer = http("GET", f"{proxy.url}/v1/chat/completions")
    assert answer[0] == 405 and answer[1]["Allow"] == "POST" and _error(answer)["code"] == "method_not_allowed"


def test_api_keys(engine):
    with _proxy(engine, api_keys=(hash_key("sk-right"),)) as p:
        url = f"{p.url}/v1/chat/completions"
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
            answer = http("POST", url, json=CHAT, headers=headers)
            assert answer[0] == 401 and answer[1]["WWW-Authenticate"] == "Bearer"
            assert _error(answer)["type"] == "authentication_error"
        assert http("GET", f"{p.url}/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            _openai(p, "sk-wrong").chat.completions.create(**CHAT)
        assert _openai(p, "sk-right").chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")
        assert http("GET", f"{p.url}/healthz")[0] == 200  # operations endpoints need no key
        doc = json.loads(http("GET", f"{p.url}/openapi.json")[2])
        assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]


def test_the_cache_never_tells_one_caller_what_another_sent(engine):
    """Caller B sends the prompt A sent: without cache_shared, B is served by the engine (no
    `x-served-by: cache` betraying A), while A's own repeat is a hit; with it, B gets A's entry."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "my secret plan"}], "max_tokens": 5, "temperature": 0}
    keys = (hash_key("sk-alice"), hash_key("sk-bob"))
    for shared, bob_sees in ((False, "local"), (True, "cache")):
        with _proxy(engine, api_keys=keys, cache_shared=shared) as p:
            url = f"{p.url}/v1/chat/completions"
            alice, bob = ({"Authorization": f"Bearer sk-{who}"} for who in ("alice", "bob"))
            assert http("POST", url, json=body, headers=alice)[1]["x-served-by"] == "local"
            assert http("POST", url, json=body, headers=bob)[1]["x-served-by"] == bob_sees
            assert http("POST", url, json=body, headers=alice)[1]["x-served-by"] == "cache"
            assert http("POST", url, json=body, headers=bob)[1]["x-served-by"] == "cache"


def test_rate_limits(engine):
    with _proxy(engine, rate_limit_requests_per_min=2) as p:
        url = f"{p.url}/v1/chat/completions"
        assert [http("POST", url, json=CHAT)[0] for _ in range(2)] == [200, 200]
        answer = http("POST", url, json=CHAT)
        assert answer[0] == 429 and int(answer[1]["Retry-After"]) >= 1
        assert _error(answer)["code"] == "rate_limit_exceeded"
    with _proxy(engine, rate_limit_tokens_per_min=20) as p:
        url = f"{p.url}/v1/chat/completions"
        assert http("POST", url, json={**CHAT, "max_tokens": 30, "ignore_eos": True})[0] == 200  # 30+ tokens: in debt
        answer = http("POST", url, json=CHAT)
        assert answer[0] == 429 and int(answer[1]["Retry-After"]) >= 30 and "token rate limit" in _error(answer)["message"]


def test_engine_down_is_503_then_recovers(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="ep-", dir="/tmp") as d:
        socket_path = Path(d) / "e.sock"
        with Proxy(ProxyConfig(engine_socket=str(socket_path), model_aliases=(ALIAS,))) as p:
            url = f"{p.url}/v1/chat/completions"
            for _ in range(2):
                answer = http("POST", url, json=CHAT)
                assert answer[0] == 503 and int(answer[1]["Retry-After"]) >= 1
                assert _error(answer)["code"] == "engine_unavailable"
            status, headers, body = http("GET", f"{p.url}/readyz")
            assert status == 503 and headers["Retry-After"] and json.loads(body)["status"] == "unavailable"
            with Engine(tiny_model_dir, socket_path):
                answers = []
                for _ in range(100):  # the sidecar reconnects (with backoff, and at once on a request)
                    answers.append(http("POST", url, json=CHAT)[0])
                    if answers[-1] == 200:
                        break
                    time.sleep(0.05)
                assert answers[-1] == 200 and set(answers) <= {200, 503}
                status, _, body = http("GET", f"{p.url}/readyz")
                assert status == 200 and json.loads(body)["status"] == "ready"
            answer = http("POST", url, json={**CHAT, "max_tokens": 5})
            assert answer[0] == 503 and _error(answer)["code"] == "engine_unavailable"


# ---------------------------------------------------------------------------------------------- slow engine: busy, deadlines, disconnects


def test_busy_engine_is_503_with_retry_after(slow_engine):
    with _proxy(slow_engine) as p:
        url = f"{p.url}/v1/chat/completions"

        async def main():
            async with aiohttp.ClientSession() as session:
                running = await session.post(url, json={**CHAT, **LONG, "stream": True})
                await running.content.readline()  # streaming: it holds the only slot
                queued = asyncio.create_task(_request("POST", url, json={**CHAT, **LONG, "temperature": 0.5}))
                for _ in range(200):
                    if (await _async_status(slow_engine))["queue_depth"] == 1:
                        break
                    await asyncio.sleep(0.01)
                refused = await _request("POST", url, json=CHAT)
                running.close()
                queued.cancel()
                return refused

        answer = run(main())
        assert answer[0] == 503 and int(answer[1]["Retry-After"]) >= 1 and _error(answer)["code"] == "engine_busy"
        _wait_idle(slow_engine)


async def _async_status(engine: Engine) -> dict:
    async with await EngineClient.connect(engine.socket_path) as client:
        return await client.status()


def test_client_gone_cancels_the_engine_work(slow_engine):
    cancelled = []
    real_cancel = slow_engine.scheduler.cancel
    slow_engine.scheduler.cancel = lambda rid: cancelled.append(rid) or real_cancel(rid)
    try:
        with _proxy(slow_engine) as p:
            url = f"{p.url}/v1/chat/completions"

            async def stream_then_leave():
                async with aiohttp.ClientSession() as session:
                    response = await session.post(url, json={**CHAT, **LONG, "stream": True})
                    for _ in range(3):
                        await response.content.readline()
                    response.close()

            run(stream_then_leave())
            status = _wait_idle(slow_engine)
            assert len(cancelled) == 1 and status["running"] == 0

            async def give_up_waiting():
                timeout = aiohttp.ClientTimeout(total=0.3)
                with pytest.raises(asyncio.TimeoutError):
                    await _request("POST", url, json={**CHAT, **LONG}, timeout=timeout)

            run(give_up_waiting())
            for _ in range(200):
                if len(cancelled) == 2:
                    break
                time.sleep(0.01)
            assert len(cancelled) == 2 and _wait_idle(slow_engine)["running"] == 0
            metrics = http("GET", f"{p.url}/metrics")[2].decode()
            assert 'status="499"' in metrics
    finally:
        slow_engine.scheduler.cancel = real_cancel


def test_deadline_is_504_or_an_error_event(slow_engine):
    with _proxy(slow_engine, request_timeout_s=0.3) as p:
        url = f"{p.url}/v1/chat/completions"
        answer = http("POST", url, json={**CHAT, **LONG})
        assert answer[0] == 504 and _error(answer)["code"] == "timeout"
        status, _, body = http("POST", url, json={**CHAT, **LONG, "stream": True})
        events = _sse(body)
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "timeout" and events[1]["choices"][0]["delta"]["content"] is not None
        with pytest.raises(openai.APIError, match="did not finish"):
            list(_openai(p).chat.completions.create(**{**CHAT, "max_tokens": 200}, stream=True, extra_body={"ignore_eos": True}))
    _wait_idle(slow_engine)


def test_engine_lost_midway_ends_the_stream_with_an_error_event(slow_engine):
    with _proxy(slow_engine) as p:
        url = f"{p.url}/v1/chat/completions"

        async def main():
            async with aiohttp.ClientSession() as session:
                response = await session.post(url, json={**CHAT, **LONG, "stream": True})
                await response.content.readuntil(b"\n\n")
                slow_engine.call(lambda: [conn._kill() for conn in list(slow_engine.server.connections)])
                return _sse(await response.read())

        events = run(main())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_unavailable"
        _wait_idle(slow_engine)
        for _ in range(100):  # reconnected
            if http("POST", url, json=CHAT)[0] == 200:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the sidecar never reconnected")


# ---------------------------------------------------------------------------------------------- operations


def test_health_ready_metrics(proxy, engine):
    assert http("GET", f"{proxy.url}/healthz")[:1] == (200,)
    status, _, body = http("GET", f"{proxy.url}/readyz")
    assert status == 200 and json.loads(body)["model"] == engine.server.model_info["id"]
    http("POST", f"{proxy.url}/v1/chat/completions", json={**CHAT, "temperature": 0.5})
    status, headers, body = http("GET", f"{proxy.url}/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert _metric(text, 'edge_proxy_requests_total{route="/v1/chat/completions",status="200"}') >= 1
    for name in ("edge_proxy_request_duration_seconds_count", "edge_proxy_time_to_first_token_seconds_count",
                 "edge_proxy_tokens_generated_total", "edge_proxy_cache_misses_total"):
        assert _metric(text, name) >= 1, name
    assert _metric(text, "edge_proxy_engine_up") == 1 and "edge_proxy_engine_queue_depth 0.0" in text


def test_openapi_document_is_valid_and_lists_every_route(proxy):
    from openapi_spec_validator import validate

    status, _, body = http("GET", f"{proxy.url}/openapi.json")
    doc = json.loads(body)
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    served = {(route.resource.canonical, route.method.lower()) for route in proxy.app.router.routes() if route.method != "HEAD"}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"}
    assert served == documented


def test_access_log_is_one_json_line_with_the_request_id(proxy, caplog):
    with caplog.at_level(logging.INFO, logger="proxy.access"):
        http("GET", f"{proxy.url}/healthz", headers={"x-request-id": "log-me-1"})
        for _ in range(100):
            records = [r for r in caplog.records if getattr(r, "request_id", None) == "log-me-1"]
            if records:
                break
            time.sleep(0.01)
    assert len(records) == 1 and records[0].status == 200 and records[0].path == "/healthz"
    from edge_runtime.logs import JsonFormatter

    assert json.loads(JsonFormatter().format(records[0]))["request_id"] == "log-me-1"
