"""Continuous batching on a real model: batched greedy outputs equal the same requests run
alone, prefix-cache hits equal cold runs, cancellation and deadlines free the KV slot at once,
a full queue answers busy at once."""

from __future__ import annotations

import threading
import time

import pytest

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.generate import generate
from edge_runtime.sampling import SamplingParams
from edge_runtime.scheduler import Busy, Request, Scheduler, ShuttingDown
from edge_runtime.tokenizer import Tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


class Collector:
    """Gathers each request's chunks (the sink runs on the engine thread)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list] = {}
        self.done: dict[str, threading.Event] = {}

    def sink(self, rid: str):
        self.chunks[rid] = []
        self.done[rid] = threading.Event()

        def put(chunk) -> None:
            self.chunks[rid].append(chunk)
            if chunk.finish_reason:
                self.done[rid].set()

        return put

    def wait(self, rid: str, timeout: float = 120) -> list:
        assert self.done[rid].wait(timeout), f"{rid} did not finish"
        return self.chunks[rid]

    def tokens(self, rid: str) -> list[int]:
        return [c.token_id for c in self.wait(rid)]


@pytest.fixture(scope="module")
def model_dir(smollm_gguf, tmp_path_factory):
    return build(smollm_gguf, tmp_path_factory.mktemp("m") / "int8", BuildOptions(max_context=1024), quiet=True)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def make_scheduler(model_dir, tokenizer, **kw) -> Scheduler:
    max_batch = kw.pop("max_batch", 4)
    sched = Scheduler(OnnxRuntimeBackend(model_dir, max_batch=max_batch, max_context=1024), tokenizer, **kw)
    sched.start()
    return sched


def prompts(tokenizer) -> list[list[int]]:
    texts = [
        "The capital of Japan is",
        "List three primary colors:",
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):",
        "Water boils at",
        "The theory of relativity " * 30,  # longer than one prefill chunk
    ]
    return [tokenizer.encode(t) for t in texts]


def alone(model_dir, tokenizer, ids, max_tokens) -> list[int]:
    backend = OnnxRuntimeBackend(model_dir, max_batch=1, max_context=1024)
    return [c.token_id for c in generate(backend, tokenizer, ids, SamplingParams(max_tokens=max_tokens, **GREEDY))]


def test_batched_outputs_equal_single_runs(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer, prefill_chunk=64)
    col = Collector()
    all_ids = prompts(tokenizer)
    lengths = [24, 16, 30, 20, 12, 18]
    for i, (ids, n) in enumerate(zip(all_ids, lengths)):  # more requests than slots: some queue
        sched.submit(Request(f"r{i}", ids, SamplingParams(max_tokens=n, **GREEDY)), col.sink(f"r{i}"))
    for i, (ids, n) in enumerate(zip(all_ids, lengths)):
        assert col.tokens(f"r{i}") == alone(model_dir, tokenizer, ids, n), f"request r{i} differs"
        final = col.chunks[f"r{i}"][-1]
        assert final.finish_reason == "length" and final.usage.completion_tokens == n
    sched.shutdown(5)
    assert sched.status()["running"] == 0


def test_prefix_cache_hit_gives_identical_output(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer, prefix_cache_bytes=64 << 20, prefix_block=16)
    system = "You are a careful assistant for a factory gateway. Answer in one short sentence. " * 4
    col = Collector()
    runs = []
    for i, question in enumerate(["What is 2 + 2?", "What is 2 + 2?", "Name a color."]):
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}]), add_special_tokens=False)
        sched.submit(Request(f"p{i}", ids, SamplingParams(max_tokens=12, **GREEDY)), col.sink(f"p{i}"))
        runs.append((ids, col.tokens(f"p{i}")))
    stats = sched.status()["prefix_cache"]
    assert stats["hits"] == 2 and stats["tokens_saved"] >= 2 * 64
    for ids, tokens in runs:  # warm output equals a cold run without any cache
        assert tokens == alone(model_dir, tokenizer, ids, 12)
    sched.shutdown(5)


def test_warm_up_fills_the_prefix_cache(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer, prefix_cache_bytes=64 << 20, prefix_block=16)
    ids = tokenizer.encode("You are the assistant of a greenhouse controller. " * 6)
    sched.warm_up([ids])
    col = Collector()
    sched.submit(Request("w", ids + tokenizer.encode(" Hello"), SamplingParams(max_tokens=4, **GREEDY)), col.sink("w"))
    col.wait("w")
    assert sched.status()["prefix_cache"]["tokens_saved"] >= len(ids) // 16 * 16
    sched.shutdown(5)


def test_prefix_cache_evicts_under_its_budget(model_dir, tokenizer):
    block_bytes = 16 * OnnxRuntimeBackend(model_dir, max_batch=1).kv_bytes_per_token()
    sched = make_scheduler(model_dir, tokenizer, prefix_cache_bytes=3 * block_bytes, prefix_block=16)
    col = Collector()
    for i in range(3):
        sched.submit(Request(f"e{i}", tokenizer.encode(f"Prompt number {i}: " + "lorem ipsum " * 20), SamplingParams(max_tokens=2, **GREEDY)), col.sink(f"e{i}"))
        col.wait(f"e{i}")
    stats = sched.status()["prefix_cache"]
    assert stats["bytes_used"] <= 3 * block_bytes and stats["evictions"] > 0
    sched.shutdown(5)


def test_cancel_frees_the_slot_at_once(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer)
    col = Collector()
    sched.submit(Request("c", tokenizer.encode("Count to one thousand:"), SamplingParams(max_tokens=500, **GREEDY)), col.sink("c"))
    while not col.chunks["c"]:
        time.sleep(0.01)
    assert sched.cancel("c")
    chunks = col.wait("c")
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 500
    assert sched.status()["running"] == 0
    assert not any(sched.backend._in_use)
    assert not sched.cancel("c")  # unknown now
    sched.shutdown(5)


def test_deadline_ends_the_request_with_a_reason(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer)
    col = Collector()
    req = Request("d", tokenizer.encode("Tell me a long story:"), SamplingParams(max_tokens=500, **GREEDY), deadline=time.monotonic() + 0.3)
    sched.submit(req, col.sink("d"))
    final = col.wait("d")[-1]
    assert final.finish_reason == "deadline" and final.usage.completion_tokens < 500
    assert sched.status()["running"] == 0
    sched.shutdown(5)


def test_full_queue_answers_busy_at_once(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer, max_batch=1, queue_size=1)
    col = Collector()
    long = SamplingParams(max_tokens=300, **GREEDY)
    ids = tokenizer.encode("Write an essay:")
    sched.submit(Request("a", ids, long), col.sink("a"))
    while sched.status()["running"] == 0:
        time.sleep(0.01)
    sched.submit(Request("b", ids, long), col.sink("b"))  # waits in the queue
    with pytest.raises(Busy) as info:  # raised by submit itself: nothing waits for room
        sched.submit(Request("c", ids, long), col.sink("c"))
    assert info.value.estimated_wait_s > 0
    assert sched.status()["queue_depth"] == 1
    sched.cancel("a"), sched.cancel("b")
    sched.shutdown(5)


def test_shutdown_lets_running_streams_finish(model_dir, tokenizer):
    sched = make_scheduler(model_dir, tokenizer)
    col = Collector()
    sched.submit(Request("s", tokenizer.encode("Hello"), SamplingParams(max_tokens=20, **GREEDY)), col.sink("s"))
    sched.shutdown(30)
    assert col.wait("s")[-1].finish_reason == "length"
    with pytest.raises(ShuttingDown):
        sched.submit(Request("late", tokenizer.encode("Hello"), SamplingParams(max_tokens=2)), col.sink("late"))
