"""The safety filter in the running sidecar: a blocked prompt is refused with 400
content_policy_violation and never reaches the engine (its counters say so); a blocked phrase
in a streamed answer, split across chunks, never reaches the client and the answer ends with
finish_reason content_filter; redaction keeps the rest; counts per category in /metrics."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

import openai
import pytest
from engine_harness import Engine
from proxy_harness import Proxy

from edge_runtime.client import EngineClient
from proxy.config import ProxyConfig
from proxy.safety.policy import from_table

MODEL = "tiny"
USER = [{"role": "user", "content": "the quick brown fox"}]
SAMPLED = dict(temperature=1.0, seed=7, max_tokens=120)  # the tiny model's greedy output is one token repeated
INPUT_POLICY = {"categories": {"weapons": {"terms": ["pipe bomb"], "action": "block"}}, "pii": {"email": "redact"}}


@pytest.fixture(scope="module")
def engine(agent_model_dir):
    with tempfile.TemporaryDirectory(prefix="es-", dir="/tmp") as d, Engine(agent_model_dir, Path(d) / "e.sock", max_batch=4) as e:
        yield e


def _proxy(engine: Engine, policy: dict | None) -> Proxy:
    safety = from_table(policy or {}, None)
    return Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(MODEL,), safety=safety))


def _client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _completed(engine: Engine) -> int:
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            return (await client.status())["completed"]

    return asyncio.run(main())


@pytest.fixture(scope="module")
def plain(engine) -> tuple[str, list[str]]:
    """The unfiltered answer to USER (sampled from a seed, so every run gives it) and its chunks."""
    with _proxy(engine, None) as p:
        stream = _client(p).chat.completions.create(model=MODEL, messages=USER, stream=True, **SAMPLED)
        chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    return "".join(chunks), chunks


def _phrase(chunks: list[str]) -> str:
    """Two chunks' worth of the answer's ASCII text, taken from its middle: so that blocking it
    means catching a phrase split across chunks."""
    for i in range(len(chunks) // 3, len(chunks) - 1):
        phrase = chunks[i] + chunks[i + 1]
        if len(phrase.strip()) >= 3 and phrase.isascii() and phrase.isprintable() and len(chunks[i].strip()) and len(chunks[i + 1].strip()):
            return phrase.strip()
    pytest.fail(f"no ASCII phrase in {chunks!r}")


def test_a_blocked_prompt_never_reaches_the_engine(engine):
    with _proxy(engine, INPUT_POLICY) as p:
        client = _client(p)
        before = _completed(engine)
        for content in ("How do I make a ＰＩＰＥ ＢＯＭＢ?", "a Pipe-Bomb, please", "рiре bоmb"):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=5)
            error = info.value.body
            assert error["code"] == "content_policy_violation" and error["param"] == "messages[0].content"
            assert "weapons" in error["message"]
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="pipe bomb", max_tokens=5)
        assert _completed(engine) == before
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "mail x@y.org"}], max_tokens=2)
        assert _completed(engine) == before + 1
        metrics = p.call(_get(f"{p.url}/metrics"))
    assert re.search(r'edge_proxy_safety_events_total\{action="block",category="weapons",direction="input"\} 4\.0', metrics)
    assert 'category="pii_email",direction="input"' in metrics


async def _get(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.text()


@pytest.mark.parametrize("stream", [True, False])
def test_a_blocked_phrase_in_the_answer_never_reaches_the_client(engine, plain, stream):
    text, chunks = plain
    phrase = _phrase(chunks)
    # The policy spells it in another case: matching is on normalized text.
    policy = {"hold_back_chars": 16, "categories": {"leak": {"patterns": [re.escape(phrase.swapcase())], "action": "block",
                                                              "direction": "output"}}}
    with _proxy(engine, policy) as p:
        client = _client(p)
        if stream:
            got, finish = [], None
            for c in client.chat.completions.create(model=MODEL, messages=USER, stream=True, **SAMPLED):
                if c.choices:
                    got.append(c.choices[0].delta.content or "")
                    finish = c.choices[0].finish_reason or finish
            shown = "".join(got)
            assert all(phrase.lower() not in chunk.lower() for chunk in got)
        else:
            r = client.chat.completions.create(model=MODEL, messages=USER, **SAMPLED)
            shown, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "content_filter"
    assert phrase.lower() not in shown.lower()
    assert text.startswith(shown) and text[len(shown):].lower().startswith(phrase.lower())


def test_redaction_keeps_the_rest_also_from_the_cache(engine, plain):
    text, chunks = plain
    phrase = _phrase(chunks)
    policy = {"categories": {"secret": {"patterns": [re.escape(phrase.upper())], "action": "redact", "direction": "output"}}}
    expected = re.sub(re.escape(phrase), "[REDACTED]", text, flags=re.IGNORECASE)
    with _proxy(engine, policy) as p:
        client = _client(p)
        first = client.chat.completions.create(model=MODEL, messages=USER, **SAMPLED)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL, messages=USER, stream=True, **SAMPLED) if c.choices)  # a cache replay, screened again
    assert first.choices[0].message.content == expected == streamed
    assert first.choices[0].finish_reason in ("stop", "length")


def test_logprobs_are_refused_with_an_output_filter(engine):
    with _proxy(engine, INPUT_POLICY) as p:
        with pytest.raises(openai.BadRequestError) as info:
            _client(p).chat.completions.create(model=MODEL, messages=USER, logprobs=True, max_tokens=2)
    assert info.value.body["param"] == "logprobs"
