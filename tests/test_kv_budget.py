"""One KV budget for live sequences and the prefix cache, on a real (tiny) model: the prefix
cache gives its blocks up when live sequences need the room, a request that does not fit waits
in line until sequences end, one request runs whatever the budget when nothing else does,
start-up refuses a budget too small for one sequence, and status and metrics show the figures."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.config import EngineConfig
from edge_runtime.generate import generate
from edge_runtime.sampling import SamplingParams
from edge_runtime.scheduler import Request, Scheduler
from edge_runtime.server import kv_budgets
from edge_runtime.tokenizer import Tokenizer
from edge_wire.settings import ConfigError
from proxy.metrics import Metrics

GREEDY = {"temperature": 0.0, "ignore_eos": True}
TIMEOUT_S = 120


class Run:
    """One request's chunks as the engine thread delivers them; `on_chunk(index, chunk)` runs
    there too (to hold the engine at a point, or look at it between steps)."""

    def __init__(self, sched: Scheduler, rid: str, prompt: list[int], max_tokens: int, on_chunk=None) -> None:
        self.request = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
        self.chunks: list = []
        self.ended_at = 0.0
        self.done = threading.Event()
        self._on_chunk = on_chunk
        sched.submit(self.request, self._sink)

    def _sink(self, chunk) -> None:
        self.chunks.append(chunk)
        if self._on_chunk:
            self._on_chunk(len(self.chunks) - 1, chunk)
        if chunk.finish_reason:
            self.ended_at = time.monotonic()
            self.done.set()

    def tokens(self) -> list[int]:
        assert self.done.wait(TIMEOUT_S), f"{self.request.id} did not finish"
        assert self.chunks[-1].finish_reason == "length"
        return [c.token_id for c in self.chunks]


def held_until(event: threading.Event):
    """An on_chunk that holds the engine thread at the request's first token until `event`, so
    what the test submits meanwhile is queued before the engine looks again."""
    def hold(index: int, chunk) -> None:
        if index == 0:
            assert event.wait(TIMEOUT_S)
    return hold


def prompt(seed: int, n: int) -> list[int]:
    return [3 + (seed * 37 + i * 11) % 300 for i in range(n)]


def alone(model_dir, ids: list[int], max_tokens: int) -> list[int]:
    backend = OnnxRuntimeBackend(model_dir, max_batch=1)
    return [c.token_id for c in generate(backend, Tokenizer.from_dir(model_dir), ids, SamplingParams(max_tokens=max_tokens, **GREEDY))]


def scheduler(model_dir, **kw) -> Scheduler:
    sched = Scheduler(OnnxRuntimeBackend(model_dir, max_batch=4), Tokenizer.from_dir(model_dir), **kw)
    sched.start()
    return sched


@pytest.fixture(scope="module")
def per_token(tiny_model_dir) -> int:
    return OnnxRuntimeBackend(tiny_model_dir, max_batch=1).kv_bytes_per_token()


def test_the_prefix_cache_gives_way_to_live_sequences(tiny_model_dir, per_token):
    budget = 4 * 128 * per_token  # four rows of 128 positions
    sched = scheduler(tiny_model_dir, kv_budget_bytes=budget, prefix_cache_bytes=budget, prefix_block=16)
    totals: list[int] = []  # live KV + prefix blocks, seen between steps

    def account(index: int, chunk) -> None:
        totals.append(sched.backend.kv_bytes_allocated() + sched.prefix_cache.stats()["bytes_used"])

    for i in range(3):  # one at a time: 7 blocks of 16 tokens each, with room to spare
        Run(sched, f"fill{i}", prompt(i, 120), 2, account).tokens()
    filled = 3 * 7 * 16 * per_token
    kv = sched.status()["kv"]
    assert sched.prefix_cache.stats()["evictions"] == 0
    assert (kv["prefix_bytes"], kv["budget_bytes"], kv["bytes_allocated"]) == (filled, budget, 0)

    # Three sequences of 100 tokens need 3 x 128 positions: the prefix cache keeps what is left.
    go = threading.Event()
    hold = held_until(go)

    def first(index: int, chunk) -> None:
        hold(index, chunk)
        account(index, chunk)

    runs = [Run(sched, "live0", prompt(10, 100), 20, first)]
    runs += [Run(sched, f"live{i}", prompt(10 + i, 100), 20, account) for i in (1, 2)]
    go.set()
    for run in runs:
        assert len(run.tokens()) == 20
    stats = sched.prefix_cache.stats()
    assert stats["evictions"] > 0 and stats["bytes_used"] <= budget - 3 * 128 * per_token
    assert max(totals) <= budget and len(totals) == 3 * 2 + 3 * 20
    assert max(run.request.admitted_at for run in runs) < min(run.ended_at for run in runs)  # all three ran together
    sched.shutdown(5)


def test_a_request_that_does_not_fit_waits_its_turn(tiny_model_dir, per_token):
    sched = scheduler(tiny_model_dir, kv_budget_bytes=256 * per_token)  # one sequence of the whole context
    go = threading.Event()
    hold = held_until(go)
    waiting: list[int] = []

    def first(index: int, chunk) -> None:
        hold(index, chunk)
        if index == 5:
            waiting.append(sched.status()["queue_depth"])

    a = Run(sched, "a", prompt(1, 100), 30, first)  # 1 x 128 positions, then 1 x 256
    b = Run(sched, "b", prompt(2, 150), 12)  # with a: 2 x 256, past the budget
    c = Run(sched, "c", prompt(3, 10), 12)  # would fit beside a alone, but b is first in line
    go.set()
    for run, ids, n in ((a, prompt(1, 100), 30), (b, prompt(2, 150), 12), (c, prompt(3, 10), 12)):
        assert run.tokens() == alone(tiny_model_dir, ids, n), f"{run.request.id} differs"  # all of it, and right
    assert waiting == [2]  # b and c queued while a ran
    assert a.ended_at < b.request.admitted_at and b.ended_at < c.request.admitted_at
    sched.shutdown(5)


def test_one_request_runs_whatever_the_budget_when_nothing_else_does(tiny_model_dir, per_token):
    sched = scheduler(tiny_model_dir, kv_budget_bytes=32 * per_token, prefix_cache_bytes=1 << 20, prefix_block=16)
    run = Run(sched, "big", prompt(4, 100), 40)  # 128 positions, four times the budget, and growing
    assert run.tokens() == alone(tiny_model_dir, prompt(4, 100), 40)
    assert sched.prefix_cache.stats()["bytes_used"] == 0  # it left the prefix cache no room
    sched.shutdown(5)


def test_start_up_refuses_a_budget_smaller_than_one_sequence(tiny_model_dir, per_token, caplog):
    backend = OnnxRuntimeBackend(tiny_model_dir, max_batch=2)
    one = backend.max_context * per_token
    assert one == 128 << 10  # 256 tokens of 512 bytes: 0.125 MB
    with pytest.raises(ConfigError, match=r"kv_cache_mb = 0\.1 cannot hold one sequence of max_context = 256 tokens "
                                          r"\(512 bytes each\): set it to at least 0\.13 MB"):
        kv_budgets(EngineConfig(kv_cache_mb=0.1), backend)
    assert kv_budgets(EngineConfig(kv_cache_mb=one / 2**20, prefix_cache_mb=0), backend) == (one, 0)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.server"):
        assert kv_budgets(EngineConfig(kv_cache_mb=1, prefix_cache_mb=64), backend) == (1 << 20, 1 << 20)
    assert [r.getMessage() for r in caplog.records if r.name == "edge_runtime.server"] == [
        "prefix_cache_mb = 64 is more than kv_cache_mb = 1: the prefix cache gets at most kv_cache_mb"]


def test_the_sidecar_reports_live_kv_over_the_budget():
    metrics = Metrics()
    metrics.set_engine_status({"kv": {"bytes_allocated": 1 << 20, "bytes_used": 1 << 19, "prefix_bytes": 3 << 20,
                                      "budget_bytes": 4 << 20}})
    samples = {(s.name, s.labels.get("state")): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("edge_kv_cache_usage_perc", None)] == 0.25
    assert {state: samples[("edge_kv_cache_bytes", state)] for state in ("allocated", "used", "prefix", "budget")} == {
        "allocated": 1 << 20, "used": 1 << 19, "prefix": 3 << 20, "budget": 4 << 20}
