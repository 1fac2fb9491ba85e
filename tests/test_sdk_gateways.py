"""The SDK against the real sidecar (two of them over one tiny engine, in-process): typed answers,
streams and errors, sync and async; and failover when one gateway is stopped mid-run, with no
request lost."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import pytest
from engine_harness import Engine
from proxy_harness import Proxy

from edge_client import (
    AsyncEdgeClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletionChunk,
    EdgeClient,
    NotFoundError,
    RetryPolicy,
)
from proxy.auth.keys import hash_key
from proxy.config import ProxyConfig

USER = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="es-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock", max_batch=4) as e:
        yield e


def sidecar(engine: Engine, **config) -> Proxy:
    return Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("tiny",), **config))


def test_sync_client_answers_streams_and_errors(engine):
    with sidecar(engine, api_keys=(hash_key("k1"),)) as p, EdgeClient(p.url + "/v1", api_key="k1") as client:
        answer = client.chat(USER, model="tiny", max_tokens=5, temperature=0, ignore_eos=True)
        assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
        assert answer.meta.served_by == "local" and answer.meta.request_id.startswith("ec-") and answer.model
        again = client.chat(USER, model="tiny", max_tokens=5, temperature=0, ignore_eos=True)
        assert again.text == answer.text and again.meta.served_by == "cache"

        chunks = list(client.chat_stream(USER, model="tiny", max_tokens=5, temperature=0, ignore_eos=True,
                                         stream_options={"include_usage": True}))
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
        assert "".join(c.text for c in chunks) == answer.text and chunks[-1].usage.completion_tokens == 5

        completion = client.complete("the quick", model="tiny", max_tokens=4, temperature=0)
        streamed = "".join(c.text for c in client.complete_stream("the quick", model="tiny", max_tokens=4, temperature=0))
        assert completion.text == streamed and completion.usage.completion_tokens >= 1
        assert {m.id for m in client.models()} >= {"tiny"}

        with pytest.raises(NotFoundError) as info:
            client.chat(USER, model="no-such-model")
        assert info.value.param == "model" and info.value.request_id
        with pytest.raises(BadRequestError) as info:
            client.chat(USER, model="tiny", temperature=5)
        assert info.value.param == "temperature"
        with EdgeClient(p.url, api_key="wrong") as bad, pytest.raises(AuthenticationError):
            bad.models()

        with client.chat_stream(USER, model="tiny", max_tokens=200, ignore_eos=True) as stream:
            first = next(iter(stream))  # leaving early closes the stream: the engine stops
        assert first.choices[0].delta.role == "assistant"


def test_failover_when_a_gateway_stops_mid_run(engine):
    a, b = sidecar(engine), sidecar(engine)
    with a, b, EdgeClient([a.url, b.url], retry=RetryPolicy(backoff_base_s=0.01), cooldown_s=0.5) as client:
        served: list[str] = []
        failures: list[BaseException] = []
        stopped = threading.Event()

        def worker(n: int) -> None:
            for i in range(n):
                try:
                    answer = client.chat(USER, model="tiny", max_tokens=2, temperature=0, seed=i)
                    served.append(answer.meta.gateway)
                except BaseException as exc:  # noqa: BLE001 - every loss is reported
                    failures.append(exc)

        threads = [threading.Thread(target=worker, args=(30,)) for _ in range(3)]
        for t in threads:
            t.start()
        while len(served) < 15 and not failures:
            time.sleep(0.01)
        a.__exit__(None, None, None)  # a graceful stop, as systemd's SIGTERM would do
        stopped.set()
        at_stop = len(served)
        for t in threads:
            t.join(60)
        assert not failures, failures
        assert len(served) == 90  # no request lost
        assert a.url in served[:at_stop] and set(served[-40:]) == {b.url}
        assert next(g for g in client.pool.gateways if g.url == a.url).needs_probe


def test_async_client_streams_and_fails_over(engine):
    async def main(url_a: str, url_b: str, stop_a) -> None:
        async with AsyncEdgeClient([url_a, url_b], retry=RetryPolicy(backoff_base_s=0.01)) as client:
            stream = await client.chat_stream(USER, model="tiny", max_tokens=4, temperature=0, ignore_eos=True)
            texts = [c.text async for c in stream]
            answer = await client.chat(USER, model="tiny", max_tokens=4, temperature=0, ignore_eos=True)
            assert "".join(texts) == answer.text
            await asyncio.to_thread(stop_a)
            results = await asyncio.gather(*(client.chat(USER, model="tiny", max_tokens=2, seed=i) for i in range(8)))
            assert {r.meta.gateway for r in results} == {url_b}
            assert "tiny" in {m.id for m in await client.models()}

    a, b = sidecar(engine), sidecar(engine)
    with a, b:
        asyncio.run(asyncio.wait_for(main(a.url, b.url, lambda: a.__exit__(None, None, None)), 60))
