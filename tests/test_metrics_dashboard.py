"""The sidecar's Prometheus metrics in vLLM's names and shapes, with the engine's figures (queue
time from done frames, KV usage from status frames), /health, and the Grafana dashboard
(docs/grafana/edge-runtime.json): every PromQL query in it is parsed and every metric it names is
exported by a real sidecar in front of the tiny engine, scraped after a few requests."""

from __future__ import annotations

import json
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from engine_harness import Engine
from prometheus_client.parser import text_string_to_metric_families
from proxy_harness import Proxy

from agent_harness import TOOLS
from proxy.config import ProxyConfig

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "edge-runtime.json"
MODEL = "tiny"
USER = [{"role": "user", "content": "the quick brown fox"}]

# -- a PromQL reader: enough of the grammar to tell metric names from functions, keywords and labels

_FUNCTIONS = {"abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "clamp_max", "clamp_min", "count",
              "count_over_time", "delta", "deriv", "floor", "group", "histogram_quantile", "idelta", "increase",
              "irate", "label_replace", "label_values", "max", "max_over_time", "min", "min_over_time", "quantile",
              "rate", "resets", "round", "scalar", "sort", "sort_desc", "stddev", "sum", "sum_over_time", "time",
              "topk", "vector"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(r'\s+|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`|\{[^{}]*\}|\[[^\[\]]*\]'
                    r'|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<op>[-+*/%^(),]|[=!<>]=?)')


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; AssertionError on what does not parse."""
    names: set[str] = set()
    tokens = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m is not None and m.end() > pos, f"cannot read {expr[pos:]!r} in {expr!r}"
        pos = m.end()
        if m.group("name") or m.group("number") or m.group("op"):
            tokens.append(m.group(0))
        elif m.group(0).startswith("{") and tokens and tokens[-1] in ("(", ",", *_KEYWORDS):
            tokens.append("{}")  # a selector without a metric name
    depth = 0
    skip_labels = False
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            assert depth >= 0, f"unbalanced parentheses in {expr!r}"
            skip_labels = False
        elif skip_labels or token in _KEYWORDS or re.fullmatch(r"[\d.e+-]+", token) or not re.match(r"[A-Za-z_:]", token):
            continue
        elif token in _LABEL_LISTS:
            assert following == "(" or token.startswith("group_"), f"{token} needs a label list in {expr!r}"
            skip_labels = following == "("
        elif following == "(" or following in _LABEL_LISTS:  # a function, or an aggregation `sum by (...) (...)`
            assert token in _FUNCTIONS, f"unknown function {token!r} in {expr!r}"
        else:
            names.add(token)
    assert depth == 0, f"unbalanced parentheses in {expr!r}"
    return names


def _queries(dashboard: dict) -> list[str]:
    out = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" or (key == "query" and isinstance(value, str) and "(" in value):
                    out.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return out


def test_the_promql_reader():
    assert metric_names('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{job=~"$job", x="a(b)"}[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("sum(rate(x_total[5m])) / (sum(rate(y_total[5m])) + on(job) group_left z) > bool 0") == {"x_total", "y_total", "z"}
    assert metric_names('label_values(up{job=~"$job"}, instance)') == {"up", "instance"}  # label_values: callers take the first
    with pytest.raises(AssertionError):
        metric_names("sum(rate(x[5m])")
    with pytest.raises(AssertionError):
        metric_names("frobnicate(x)")


# -- the running service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(agent_model_dir):
    """An engine and its sidecar after a few requests: plain, streamed, a tool call, one cut short."""
    with tempfile.TemporaryDirectory(prefix="em-", dir="/tmp") as d, \
            Engine(agent_model_dir, Path(d) / "e.sock", max_batch=4, prefix_cache_bytes=4 << 20) as engine, \
            Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(MODEL,))) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answers = [client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, seed=s, temperature=1.0)
                   for s in range(3)]
        answers.append(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                      parallel_tool_calls=False, temperature=0, max_tokens=300))
        list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, temperature=0, stream=True))
        yield proxy, answers, _get(f"{proxy.url}/metrics")[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _exported(text: str) -> dict[str, float]:
    """Every sample name the scrape exports (with the family's own suffixes, even when a labelled
    family has no sample yet), to its value summed over labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        for suffix in suffixes:
            out.setdefault(family.name + suffix, 0.0)
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_every_dashboard_query_names_an_exported_metric(service):
    _, _, text = service
    exported = _exported(text)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 20
    used: set[str] = set()
    for expr in queries:
        names = metric_names(expr)
        if expr.startswith("label_values("):
            names = {re.match(r"label_values\(([A-Za-z_:][A-Za-z0-9_:]*)", expr).group(1)}
        assert names, f"no metric in {expr!r}"
        missing = names - exported.keys()
        assert not missing, f"{expr!r} names metrics the sidecar does not export: {sorted(missing)}"
        used |= names
    # The vLLM-shaped metrics are all on the dashboard.
    for name in ("edge_time_to_first_token_seconds_bucket", "edge_time_per_output_token_seconds_bucket",
                 "edge_request_queue_time_seconds_bucket", "edge_request_prompt_tokens_bucket",
                 "edge_request_generation_tokens_bucket", "edge_request_success_total", "edge_kv_cache_usage_perc"):
        assert name in used


def test_the_vllm_shaped_metrics_carry_the_engine_figures(service):
    _, answers, text = service
    exported = _exported(text)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    n = len(answers) + 1  # and the streamed one
    reasons = {s.labels["finished_reason"]: s.value for s in families["edge_request_success"].samples if s.name.endswith("_total")}
    assert reasons.get("tool_calls") == 1 and sum(reasons.values()) == n
    assert exported["edge_request_queue_time_seconds_count"] == n  # from the engine's done frames
    assert exported["edge_request_prompt_tokens_sum"] == sum(a.usage.prompt_tokens for a in answers) + answers[0].usage.prompt_tokens
    assert exported["edge_request_generation_tokens_count"] == n
    assert exported["edge_time_to_first_token_seconds_count"] == n
    assert exported["edge_time_per_output_token_seconds_count"] > 0
    assert exported["edge_e2e_request_latency_seconds_count"] == n
    assert exported["edge_generation_tokens_total"] == exported["edge_proxy_tokens_generated_total"] > 0  # the old name still works
    assert exported["edge_prefix_cache_hits_total"] + exported["edge_prefix_cache_misses_total"] > 0  # status frames


def test_kv_usage_while_a_request_holds_a_slot(service):
    proxy, _, idle = service
    assert _exported(idle)["edge_kv_cache_usage_perc"] == 0.0
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=60)
    # ignore_eos and a budget of most of the context: still generating when the scrape comes
    with client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1900, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}) as stream:
        next(c for c in stream if c.choices and c.choices[0].delta.content)
        busy = _exported(_get(f"{proxy.url}/metrics")[1])
    assert 0.0 < busy["edge_kv_cache_usage_perc"] <= 1.0
    assert busy["edge_num_requests_running"] == 1
    assert busy["edge_kv_cache_bytes"] > 0


def test_health_is_200_while_serving_and_503_without_an_engine(service):
    proxy, _, _ = service
    assert _get(f"{proxy.url}/health") == (200, '{"status":"ok"}')
    with tempfile.TemporaryDirectory(prefix="em-", dir="/tmp") as d, \
            Proxy(ProxyConfig(engine_socket=str(Path(d) / "none.sock"))) as alone:
        status, body = _get(f"{alone.url}/health")
        assert status == 503 and json.loads(body) == {"status": "unavailable", "reason": "the engine is unreachable"}
        assert _get(f"{alone.url}/healthz")[0] == 200  # alive, though not serving
