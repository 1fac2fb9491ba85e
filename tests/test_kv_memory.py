"""The KV cache costs what it holds: it grows with the tokens held, is returned when sequences
end (in either element type), keeps its contents across resizes, and is half the size in fp16."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.backends.kv_store import MIN_CAPACITY, capacity_for
from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions, build


@pytest.fixture(scope="module")
def fp32_kv_model(tiny_checkpoints, tmp_path_factory):
    return build(tiny_checkpoints["llama"][0], tmp_path_factory.mktemp("kv32") / "m", BuildOptions(kv_dtype="fp32"), quiet=True)


@pytest.fixture(scope="module")
def fp16_kv_model(tiny_checkpoints, tmp_path_factory):
    return build(tiny_checkpoints["llama"][0], tmp_path_factory.mktemp("kv16") / "m", BuildOptions(kv_dtype="fp16"), quiet=True)


def test_capacity_is_the_next_power_of_two_within_bounds():
    assert capacity_for(1, 8192) == MIN_CAPACITY
    assert capacity_for(MIN_CAPACITY + 1, 8192) == 2 * MIN_CAPACITY
    assert capacity_for(1000, 8192) == 1024
    assert capacity_for(1000, 600) == 600


@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_kv_memory_grows_with_tokens_held_and_returns_when_sequences_end(kv, fp32_kv_model, fp16_kv_model):
    backend = OnnxRuntimeBackend(fp32_kv_model if kv == "fp32" else fp16_kv_model, max_batch=8)
    per_token = backend.kv_bytes_per_token()
    assert backend.kv_bytes_allocated() == 0  # max_batch costs nothing until used

    a = backend.allocate()
    backend.prefill(a, np.arange(1, 11))
    assert backend.kv_bytes_allocated() == 1 * MIN_CAPACITY * per_token
    b = backend.allocate()
    backend.prefill(b, np.arange(1, 101))
    assert backend.kv_bytes_allocated() == 2 * 128 * per_token
    for _ in range(30):  # decoding past 128 positions doubles the capacity once
        backend.decode([a, b], [5, 6])
    assert backend.seq_len(b) == 130
    assert backend.kv_bytes_allocated() == 2 * 256 * per_token

    backend.free(b)  # the long sequence ends: one row of the short one's size is left
    assert backend.kv_bytes_allocated() == 1 * MIN_CAPACITY * per_token
    backend.free(a)
    assert backend.kv_bytes_allocated() == 0


def test_contents_survive_resizes(fp32_kv_model):
    """A sequence whose cache is grown (and another's shrunk away) mid-way gets the logits it
    gets when its cache never moves."""
    backend = OnnxRuntimeBackend(fp32_kv_model, max_batch=3)
    ids = np.random.default_rng(0).integers(0, 320, 150)
    whole = backend.allocate()
    reference = backend.prefill_logits(whole, ids)
    backend.free(whole)

    low, grown = backend.allocate(), backend.allocate()
    backend.prefill(low, ids[:50])
    pieces = [backend.prefill_logits(grown, ids[i : i + 30]) for i in range(0, 60, 30)]  # capacity 64
    pieces.append(backend.prefill_logits(grown, ids[60:100]))  # grows to 128
    backend.free(low)  # row 0 is free now but row 1 still held: no shrink below it
    pieces.append(backend.prefill_logits(grown, ids[100:]))  # grows to 256
    np.testing.assert_allclose(np.concatenate(pieces), reference, rtol=1e-5, atol=1e-5)


def test_exported_kv_imports_into_another_slot(fp32_kv_model):
    backend = OnnxRuntimeBackend(fp32_kv_model, max_batch=2)
    ids = np.arange(3, 43)
    src = backend.allocate()
    expected = backend.prefill(src, ids)
    dst = backend.allocate()
    backend.import_kv(dst, backend.export_kv(src, 0, 39))
    assert backend.seq_len(dst) == 39
    np.testing.assert_allclose(backend.prefill(dst, ids[39:]), expected, rtol=1e-5, atol=1e-5)


def test_fp16_cache_is_half_the_bytes(fp16_kv_model, fp32_kv_model):
    fp16 = OnnxRuntimeBackend(fp16_kv_model, max_batch=1).kv_bytes_per_token()
    assert fp16 * 2 == OnnxRuntimeBackend(fp32_kv_model, max_batch=1).kv_bytes_per_token()
