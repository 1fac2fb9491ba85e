"""Logit parity of our ONNX builds (both graph flavours: ONNX Runtime's and TensorRT's, the
latter run here on ONNX Runtime's CPU provider) against transformers' reference
implementations, on random small checkpoints of each architecture: fp32 tight, INT8 by KL
divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from logit_metrics import mean_kl

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions, build

ARCHS = ("llama", "qwen2", "glm", "glm4")
FLAVOURS = ("ort", "tensorrt")
# INT8 measure: mean over positions of KL(reference || ours) of the next-token distribution.
INT8_MAX_MEAN_KL = 1e-4  # random models have flat distributions: the KL is ~1e-6
INT4_MAX_MEAN_KL = 1e-3  # 16 levels a block: the KL is ~1e-4 to 4e-4, ~100x INT8's


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


def our_logits(backend: OnnxRuntimeBackend, ids: np.ndarray) -> np.ndarray:
    """Prefill in two chunks (the second attends to the cached first), then decode token by token."""
    slot = backend.allocate()
    try:
        first = backend.prefill_logits(slot, ids[:9])
        second = backend.prefill_logits(slot, ids[9:15])
        steps = [backend.decode([slot], [int(t)])[0] for t in ids[15:]]
        return np.concatenate([first, second, np.stack(steps)])
    finally:
        backend.free(slot)


@pytest.fixture(scope="module")
def builds(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("builds")
    return {
        # fp32 with the default fp32 KV cache (exact parity); ort INT8 with an fp16 cache (its KL bound
        # covers it); the tensorrt flavour keeps its cache in fp32.
        (arch, quant, flavour): build(ckpt, out / f"{arch}-{quant}-{flavour}", BuildOptions(
            quant=quant, flavour=flavour, kv_dtype="fp16" if quant != "fp32" and flavour == "ort" else "fp32"), quiet=True)
        for arch, (ckpt, _) in tiny_checkpoints.items()
        for quant in ("fp32", "int8")
        for flavour in FLAVOURS
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_matches_reference_for_prefill_and_decode(arch, flavour, tiny_checkpoints, builds):
    _, ref_model = tiny_checkpoints[arch]
    ids = np.random.default_rng(1).integers(0, 320, 20)
    ref = reference_logits(ref_model, ids)
    ours = our_logits(OnnxRuntimeBackend(builds[arch, "fp32", flavour], max_batch=2), ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_stays_close_to_reference(arch, flavour, tiny_checkpoints, builds):
    _, ref_model = tiny_checkpoints[arch]
    ids = np.random.default_rng(2).integers(0, 320, 20)
    ref = reference_logits(ref_model, ids)
    ours = our_logits(OnnxRuntimeBackend(builds[arch, "int8", flavour], max_batch=2), ids)
    kl = mean_kl(ref, ours)
    print(f"{arch} {flavour} int8 mean KL {kl:.2e}")
    assert kl < INT8_MAX_MEAN_KL
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("head_bits", (8, 4))
@pytest.mark.parametrize("arch", ("llama", "glm"))
def test_int4_stays_close_to_reference(arch, head_bits, tiny_checkpoints, tmp_path):
    ckpt, ref_model = tiny_checkpoints[arch]
    model_dir = build(ckpt, tmp_path / "int4", BuildOptions(quant="int4", int4_head_bits=head_bits), quiet=True)
    ids = np.random.default_rng(4).integers(0, 320, 20)
    ref = reference_logits(ref_model, ids)
    ours = our_logits(OnnxRuntimeBackend(model_dir, max_batch=2), ids)
    kl = mean_kl(ref, ours)
    print(f"{arch} int4 (head {head_bits} bits) mean KL {kl:.2e}")
    assert kl < INT4_MAX_MEAN_KL
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.6


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("arch", ("llama", "glm4"))
def test_batched_decode_matches_single(arch, flavour, builds):
    """Sequences of different lengths decoding in one batch get the logits they get alone."""
    backend = OnnxRuntimeBackend(builds[arch, "fp32", flavour], max_batch=3)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 320, n) for n in (5, 11, 8)]
    alone = []
    for p in prompts:
        slot = backend.allocate()
        backend.prefill(slot, p[:-1])
        alone.append(backend.decode([slot], [int(p[-1])])[0])
        backend.free(slot)
    slots = [backend.allocate() for _ in prompts]
    for slot, p in zip(slots, prompts):
        backend.prefill(slot, p[:-1])
    together = backend.decode(slots, [int(p[-1]) for p in prompts])
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-5, atol=1e-5)
    # A subset of slots decodes without disturbing the one left out (slot 1).
    subset = backend.decode([slots[0], slots[2]], [1, 2])
    assert subset.shape == (2, 320)
    assert backend.seq_len(slots[1]) == len(prompts[1])
    resumed = backend.decode([slots[1]], [7])[0]
    for slot in slots:
        backend.free(slot)
    fresh = backend.allocate()
    backend.prefill(fresh, prompts[1])
    np.testing.assert_allclose(resumed, backend.decode([fresh], [7])[0], rtol=1e-5, atol=1e-5)
