"""The sidecar's parts that need no engine: its config ([proxy] table, keys from the environment,
keys required off loopback), `edge-proxy hash-key`, the key check, the rate limiter, the cache,
request parsing and the OpenAPI document's validity."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from edge_runtime.config import default_socket_path
from edge_wire.settings import ConfigError
from proxy.auth.keys import KeyChecker, hash_key
from proxy.config import ProxyConfig, load_config
from proxy.core import ratelimit
from proxy.core.cache import CachedResult, ResponseCache, cache_key
from proxy.core.errors import ApiError
from proxy.http.openai_schema import parse_chat, parse_completion
from proxy.main import main as proxy_main

KEY = "sk-test-123"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_reads_proxy_table_and_follows_the_engine_socket(tmp_path):
    path = _write(tmp_path, f"""
[engine]
socket_path = "/tmp/x/engine.sock"
max_batch = 2

[proxy]
port = 9000
api_keys = ["{hash_key(KEY)}"]
rate_limit_requests_per_min = 60
cache_ttl_s = 5
model_aliases = ["gpt-4o-mini"]
""")
    cfg = load_config(path, environ={})
    assert (cfg.port, cfg.rate_limit_requests_per_min, cfg.cache_ttl_s, cfg.model_aliases) == (9000, 60, 5, ("gpt-4o-mini",))
    assert cfg.resolved_engine_socket() == Path("/tmp/x/engine.sock")
    assert cfg.api_keys == (hash_key(KEY),)
    assert ProxyConfig().resolved_engine_socket() == default_socket_path()


def test_keys_from_the_environment_are_hashed_and_added(tmp_path):
    path = _write(tmp_path, f'[proxy]\napi_keys = ["{hash_key("a")}"]\n')
    cfg = load_config(path, environ={"EDGE_PROXY_API_KEYS": " b , c,"})
    assert cfg.api_keys == (hash_key("a"), hash_key("b"), hash_key("c"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[proxy]\nprot = 1", "unknown key 'prot'"),
        ("[proxy]\nport = 70000", "port: must be in [0, 65535]"),
        ("[proxy]\nport = \"80\"", "port: must be an integer"),
        ("[proxy]\nrequest_timeout_s = 0", "request_timeout_s: must be > 0"),
        ("[proxy]\ncache_enabled = 1", "cache_enabled: must be true or false"),
        ("[proxy]\nrate_limit_tokens_per_min = -1", "rate_limit_tokens_per_min: must be >= 0"),
        ("[proxy]\nmodel_aliases = [\"\"]", "model_aliases[0]"),
        ("[proxy]\napi_keys = [\"sk-plain-key\"]", "api_keys[0]: must be a sha256 hex digest"),
        ("[proxy]\nhost = \"0.0.0.0\"", "api_keys: required when listening on 0.0.0.0"),
        ("[proxy]\nlog_level = \"loud\"", "log_level: must be one of"),
        ("proxy = 3", "proxy must be a table"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "sk-plain-key" not in str(info.value)  # a key pasted by mistake is never echoed


def test_keys_required_off_loopback():
    for host in ("127.0.0.1", "::1", "localhost"):
        ProxyConfig(host=host)
    with pytest.raises(ConfigError, match="api_keys: required"):
        ProxyConfig().with_overrides(host="0.0.0.0")
    assert ProxyConfig(host="0.0.0.0", api_keys=(hash_key(KEY),)).host == "0.0.0.0"


def test_edge_proxy_refuses_to_listen_off_loopback_without_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGE_PROXY_API_KEYS", raising=False)
    assert proxy_main(["--config", str(_write(tmp_path, "")), "--host", "0.0.0.0"]) == 2
    assert "api_keys: required when listening on 0.0.0.0" in capsys.readouterr().err


def test_hash_key_reads_the_key_from_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(KEY + "\n"))
    assert proxy_main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(KEY)
    assert proxy_main(["hash-key", "--generate"]) == 0
    key_line, hash_line = capsys.readouterr().out.splitlines()
    assert hash_key(key_line.split()[1]) == hash_line.split()[1]


def test_key_checker():
    checker = KeyChecker((hash_key("other"), hash_key(KEY)))
    assert checker.check(f"Bearer {KEY}") == hash_key(KEY)[:12]
    for header in (None, "", KEY, "Basic abc", "Bearer wrong", f"Bearer {KEY}x"):
        with pytest.raises(ApiError) as info:
            checker.check(header)
        assert info.value.status == 401 and info.value.headers["WWW-Authenticate"] == "Bearer"


def test_rate_limiter_requests_and_token_debt(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: now[0])
    limiter = ratelimit.RateLimiter(requests_per_min=2, tokens_per_min=60)
    limiter.admit("a")
    limiter.admit("a")
    with pytest.raises(ApiError) as info:
        limiter.admit("a")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "30"
    limiter.admit("b")  # buckets are per client
    now[0] += 30
    limiter.admit("a")  # one request refilled
    limiter.charge_tokens("b", 120)  # 60 tokens in debt: a minute to pay back
    with pytest.raises(ApiError) as info:
        limiter.admit("b")
    assert "token rate limit" in info.value.message and info.value.headers["Retry-After"] == "61"


def test_cache_lru_ttl_and_byte_budget(monkeypatch):
    from proxy.core import cache as cache_module

    now = [0.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    result = CachedResult("hello", "stop", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, None)
    cache = ResponseCache(max_entries=2, max_bytes=10_000, ttl_s=10)
    keys = [cache_key("m", "chat", {"prompt": str(i)}) for i in range(3)]
    cache.put(keys[0], result)
    cache.put(keys[1], result)
    assert cache.get(keys[0]) is result  # now keys[1] is the least recently used
    cache.put(keys[2], result)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is result and len(cache) == 2
    now[0] = 11
    assert cache.get(keys[0]) is None and len(cache) == 1
    small = ResponseCache(max_entries=100, max_bytes=result.size() * 2, ttl_s=10)
    for key in keys:
        small.put(key, result)
    assert len(small) == 2 and small.bytes <= small.max_bytes
    assert cache_key("m", "chat", {"a": 1, "b": 2}) == cache_key("m", "chat", {"b": 2, "a": 1})


def _refusal(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def test_parsing_refuses_what_it_cannot_honour_naming_the_param():
    chat = lambda body: parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, 8, 1000)  # noqa: E731
    cases = {
        "n": {"n": 2}, "tools[0].type": {"tools": [{"type": "code_interpreter"}]},
        "tool_choice": {"tool_choice": "auto"}, "response_format": {"response_format": {"type": "grammar"}},
        "logit_bias": {"logit_bias": {"5": 1}}, "top_logprobs": {"top_logprobs": 2}, "temperature": {"temperature": 2.5},
        "top_p": {"top_p": 0}, "seed": {"seed": 2**64}, "max_tokens": {"max_tokens": 0}, "stop": {"stop": [""]},
        "frobnicate": {"frobnicate": 1}, "stream_options": {"stream_options": {"include_usage": True}},
    }
    for param, body in cases.items():
        assert _refusal(chat, body).param == param
    assert _refusal(lambda b: parse_chat(b, 8, 1000), {"model": "m", "messages": [{"role": "function", "content": "x"}]}).param == "messages[0].role"
    assert _refusal(lambda b: parse_chat(b, 8, 1000), {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).param == "messages[0].content[0].type"
    assert _refusal(lambda b: parse_chat(b, 1, 1000), {"model": "m", "messages": [{"role": "user", "content": "a"}] * 2}).code == "too_many_messages"
    assert _refusal(lambda b: parse_chat(b, 8, 10), {"model": "m", "messages": [{"role": "user", "content": "a" * 11}]}).code == "prompt_too_long"
    completion = lambda body: parse_completion({"model": "m", "prompt": "hi", **body}, 1000)  # noqa: E731
    for param, body in {"echo": {"echo": True}, "best_of": {"best_of": 2}, "logprobs": {"logprobs": 1},
                        "suffix": {"suffix": "x"}, "prompt": {"prompt": ["a", "b"]}}.items():
        assert _refusal(completion, body).param == param


def test_parsing_maps_to_engine_params():
    req = parse_chat({
        "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                                   {"role": "user", "content": "hi", "name": "ann"}],
        "max_completion_tokens": 5, "temperature": 0, "stop": "\n", "stream": True,
        "stream_options": {"include_usage": True}, "n": 1, "tools": [], "response_format": {"type": "text"},
    }, 8, 1000)
    assert req.prompt == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi", "name": "ann"}]}
    assert req.params["max_tokens"] == 5 and req.params["temperature"] == 0.0 and req.params["stop"] == ["\n"]
    assert req.stream and req.include_usage and req.deterministic
    assert not parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 8, 1000).deterministic
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.9, "seed": 7}, 8, 1000).deterministic
    completion = parse_completion({"model": "m", "prompt": [[5, 6, 7]], "logprobs": 0}, 1000)
    assert completion.prompt == {"prompt_ids": [5, 6, 7]} and completion.params["max_tokens"] == 16 and completion.logprobs
