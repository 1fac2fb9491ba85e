"""Models beyond the default: Llama 3 rope scaling read from a GGUF (as llama.cpp's converter
writes it) gives transformers' positions; attention shapes ONNX Runtime's fused attention
cannot run are refused at build time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.builder.checkpoint import load_checkpoint
from edge_runtime.builder.onnx_graph import rope_cache
from edge_runtime.errors import CheckpointError

HEAD_DIM, THETA = 64, 500000.0
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def llama_cpp_rope_factors(scaling: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it for Llama 3.1."""
    factor, low, high, old = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    factors = []
    for freq in 1.0 / THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def write_gguf(path: Path, scaling_type: str | None = None, rope_freqs: np.ndarray | None = None) -> Path:
    """A Llama GGUF with the metadata the builder reads and no weights (the spec needs none)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(4 * HEAD_DIM)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(512)
    w.add_context_length(131072)
    w.add_rope_freq_base(THETA)
    w.add_vocab_size(320)
    if scaling_type:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling_type))
        w.add_rope_scaling_factor(4.0)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_cos_sin(rope_scaling: dict | None, positions: int) -> tuple[np.ndarray, np.ndarray]:
    config = tf.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM, rope_theta=THETA,
                            rope_scaling=rope_scaling, max_position_embeddings=131072)
    rotary = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    return cos[0, :, : HEAD_DIM // 2].double().numpy(), sin[0, :, : HEAD_DIM // 2].double().numpy()


def test_llama3_rope_freqs_in_a_gguf_give_transformers_positions(tmp_path):
    gguf_path = write_gguf(tmp_path / "llama3.gguf", rope_freqs=llama_cpp_rope_factors(LLAMA3))
    spec = load_checkpoint(gguf_path).spec
    assert len(spec.rope_scaling["freq_factors"]) == HEAD_DIM // 2
    ours_cos, ours_sin = rope_cache(spec, 16384)
    ref_cos, ref_sin = transformers_cos_sin(LLAMA3, 16384)
    np.testing.assert_allclose(ours_cos, ref_cos, atol=2e-3)  # float32 angles at positions up to 16k
    np.testing.assert_allclose(ours_sin, ref_sin, atol=2e-3)
    unscaled, _ = rope_cache(load_checkpoint(write_gguf(tmp_path / "plain.gguf")).spec, 16384)
    assert np.abs(unscaled - ref_cos).max() > 0.5  # ignoring the factors would be far off


def test_linear_rope_scaling_in_a_gguf_stretches_positions(tmp_path):
    spec = load_checkpoint(write_gguf(tmp_path / "linear.gguf", scaling_type="linear")).spec
    assert spec.rope_scaling == {"linear_factor": 4.0}
    scaled_cos, _ = rope_cache(spec, 64)
    ref_cos, _ = transformers_cos_sin({"rope_type": "linear", "factor": 4.0}, 64)
    np.testing.assert_allclose(scaled_cos, ref_cos, atol=1e-5)


def test_unsupported_rope_scaling_in_a_gguf_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="unsupported rope scaling type 'yarn'"):
        load_checkpoint(write_gguf(tmp_path / "yarn.gguf", scaling_type="yarn"))


@pytest.mark.parametrize("arch, head_dim, message", [
    ("llama", 24, "head_dim 24 is not a multiple of 16"),
    ("glm", 48, "rotary half-width 12"),  # GLM rotates half of each head: 24 dims, 12 pairs
])
def test_attention_shapes_fused_attention_cannot_run_are_refused_at_build(arch, head_dim, message, tmp_path):
    from conftest import _tiny_tokenizer

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, head_dim=head_dim, pad_token_id=0, eos_token_id=[0])
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**common)) if arch == "llama" else tf.GlmForCausalLM(tf.GlmConfig(**common))
    model.save_pretrained(tmp_path / "ckpt")
    _tiny_tokenizer(tmp_path / "ckpt", 320)
    with pytest.raises(CheckpointError, match=message):
        build(tmp_path / "ckpt", tmp_path / "out", BuildOptions(quant="fp32"), quiet=True)
    assert not (tmp_path / "out").exists()
