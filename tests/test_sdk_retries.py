"""The SDK's retry rules against scripted gateways (tests/fake_gateway.py): Retry-After honoured,
retries stopping at max_retries and at the client's retry budget, a POST the gateway may have
started never retried (unless idempotent), refused connections failed over at once, an ejected
gateway probed back once healthy, and error answers typed by status."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from fake_gateway import FakeGateway

from edge_client import (
    APIConnectionError, AsyncEdgeClient, AuthenticationError, BadRequestError, EdgeClient, GatewayTimeoutError,
    RateLimitError, RetryPolicy, ServiceUnavailableError,
)
from edge_client.http_api import retry_after

USER = [{"role": "user", "content": "hi"}]
FAST = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05)


def dead_url() -> str:
    """A loopback port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_retry_after_429_is_honoured():
    with FakeGateway() as gw, EdgeClient(gw.url, retry=FAST) as client:
        gw.script.append((429, {"Retry-After": "1"}))
        start = time.monotonic()
        answer = client.chat(USER, model="tiny")
        assert time.monotonic() - start >= 1.0  # a lower bound: waited at least Retry-After
        assert answer.text == "hi" and len(gw.hits) == 2 and answer.meta.gateway == gw.url


def test_retries_stop_at_max_retries_and_at_the_budget():
    with FakeGateway() as gw:
        gw.script.extend([(503, {"Retry-After": "0"})] * 10)
        with EdgeClient(gw.url, retry=RetryPolicy(max_retries=2, backoff_base_s=0.01)) as client:
            with pytest.raises(ServiceUnavailableError) as info:
                client.chat(USER, model="tiny")
        assert len(gw.hits) == 3 and info.value.attempts == 3 and info.value.retry_after == 0

        gw.hits.clear()
        policy = RetryPolicy(max_retries=10, backoff_base_s=0.01, budget_reserve=3, budget_ratio=0.0)
        with EdgeClient(gw.url, retry=policy) as client:
            with pytest.raises(ServiceUnavailableError):
                client.chat(USER, model="tiny")
            assert len(gw.hits) == 4  # three retries: the budget
            with pytest.raises(ServiceUnavailableError):
                client.chat(USER, model="tiny")
            assert len(gw.hits) == 5  # budget spent: no retry at all


def test_a_post_that_may_have_started_is_not_retried():
    with FakeGateway() as gw, EdgeClient(gw.url, retry=FAST) as client:
        gw.script.extend(["drop", "drop"])
        with pytest.raises(APIConnectionError) as info:
            client.chat(USER, model="tiny")
        assert info.value.may_have_started and len(gw.hits) == 1
        assert client.chat(USER, model="tiny", idempotent=True).text == "hi"  # the caller says it is harmless
        assert len(gw.hits) == 3
        gw.script.append("drop")
        assert [m.id for m in client.models()] == ["tiny"]  # GETs are always retried
        gw.script.append((500, {}))
        with pytest.raises(Exception) as info:
            client.chat(USER, model="tiny")
        assert info.value.status == 500 and info.value.attempts == 1


def test_error_answers_are_typed_and_final():
    with FakeGateway() as gw, EdgeClient(gw.url, retry=FAST) as client:
        for status, cls in ((400, BadRequestError), (401, AuthenticationError), (504, GatewayTimeoutError)):
            gw.hits.clear()
            gw.script.append((status, {}))
            with pytest.raises(cls) as info:
                client.chat(USER, model="tiny")
            assert info.value.status == status and info.value.code == "scripted" and len(gw.hits) == 1
        gw.script.append((429, {"Retry-After": "120"}))  # longer than max_retry_after_s: raised at once
        with pytest.raises(RateLimitError) as info:
            client.chat(USER, model="tiny")
        assert info.value.retry_after == 120


def test_stream_error_event_raises_after_the_chunks_before_it():
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
             "choices": [{"index": 0, "delta": {"content": "he"}, "finish_reason": None}]}
    error = {"error": {"message": "the request did not finish within 1 s", "type": "server_error", "param": None, "code": "timeout"}}
    with FakeGateway() as gw, EdgeClient(gw.url) as client:
        gw.script.append(("stream", [chunk, chunk, error, b"[DONE]"]))
        got = []
        with pytest.raises(GatewayTimeoutError):
            for c in client.chat_stream(USER, model="tiny"):
                got.append(c.text)
        assert got == ["he", "he"]


def test_refused_gateway_fails_over_then_is_probed_back():
    dead = dead_url()
    port = int(dead.rsplit(":", 1)[1])
    with FakeGateway() as live, EdgeClient([dead, live.url], retry=FAST, cooldown_s=0.2) as client:
        for _ in range(4):
            assert client.chat(USER, model="tiny").meta.gateway == live.url
        assert len(live.hits) == 4
        down = next(g for g in client.pool.gateways if g.url == dead)
        assert down.needs_probe and down.failures >= 1
        with FakeGateway(port) as revived:
            deadline = time.monotonic() + 10
            while not revived.hits and time.monotonic() < deadline:
                client.chat(USER, model="tiny")  # each request starts the probes that are due
                time.sleep(0.05)
            assert revived.hits, "the revived gateway never got traffic back"
            assert not down.needs_probe


def test_async_client_retry_after_and_no_retry_when_started():
    async def main():
        with FakeGateway() as gw:
            async with AsyncEdgeClient(gw.url, retry=FAST) as client:
                gw.script.append((503, {"Retry-After": "1"}))
                start = time.monotonic()
                answer = await client.chat(USER, model="tiny")
                assert time.monotonic() - start >= 1.0 and answer.text == "hi"
                gw.script.append("drop")
                with pytest.raises(APIConnectionError) as info:
                    await client.chat(USER, model="tiny")
                assert info.value.may_have_started and len(gw.hits) == 3
            async with AsyncEdgeClient([dead_url(), gw.url], retry=FAST) as client:
                for _ in range(3):
                    assert (await client.chat(USER, model="tiny")).meta.gateway == gw.url

    asyncio.run(asyncio.wait_for(main(), 60))


def test_retry_after_forms():
    assert retry_after("3") == 3.0 and retry_after(None) is None and retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after(future) <= 31
