"""Schema-driven fuzzing of the sidecar from its own /openapi.json (schemathesis): valid and
invalid requests to every operation get no 5xx, no hang, and answers that match the document."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from engine_harness import Engine
from hypothesis import HealthCheck, Phase, given, settings
from proxy_harness import Proxy
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
)

from proxy.config import ProxyConfig

MAX_EXAMPLES = 30
ALIAS = "tiny"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def proxy(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="ep-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as engine:
        config = ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=(ALIAS,), max_messages=16,
                             max_prompt_chars=2000)
        with Proxy(config) as p:
            yield p


def _servable(case) -> None:
    """Valid requests name a random model (404) and may ask for thousands of tokens: name the
    served one, so that they reach the engine, and ask for a few tokens, enough to exercise it."""
    if isinstance(case.body, dict):
        case.body["model"] = ALIAS
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 4:
                case.body[key] = 4
        if "max_completion_tokens" not in case.body and case.body.get("max_tokens") is None:
            case.body["max_tokens"] = 4


def test_fuzz_every_operation(proxy):
    schema = schemathesis.openapi.from_url(f"{proxy.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the document's own endpoint; every other one is fuzzed.
    documented = sum(method in ("get", "post") for item in schema.raw_schema["paths"].values() for method in item)
    assert len(operations) == documented - 1 == 8
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                if mode == GenerationMode.POSITIVE:
                    _servable(case)
                case.call_and_validate(base_url=proxy.url, checks=checks, timeout=30)

            fuzz()
