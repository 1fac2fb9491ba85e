"""Weight quantization in the forms ONNX Runtime runs fast on the CPU: two INT8 forms, and
INT4 for MatMulNBits.

- `nbits` (default): block-wise (32) symmetric 8-bit weights for `MatMulNBits` with
  accuracy_level 4, so activations are quantized per block too and the dot products run in int8.
- `dq`: per-output-channel int8 weights for `DynamicQuantizeMatMul` (activations quantized per
  tensor at run time). As fast at batch 1, but per-tensor activation scales lose too much on
  small LLMs (see bench/int8_forms.py for both, speed and logit divergence, on this machine).
- `int4`: block-wise (32) 4-bit weights for `MatMulNBits` (accuracy_level 4), each block's 16
  levels spanning its minimum to its maximum with a float offset (llama.cpp's Q4_1 rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_FORMS = ("dq", "nbits")
NBITS_BLOCK = 32  # llama.cpp's block too; 64 and 128 lose accuracy with int8 activations


@dataclass
class PerChannelInt8:
    weight: np.ndarray  # int8 [K, N] (input-major, as MatMul wants it)
    scale: np.ndarray  # float32 [N]


@dataclass
class BlockInt8:
    blob: np.ndarray  # uint8 [N, n_blocks, block] with zero point 128
    scale: np.ndarray  # float32 [N, n_blocks]
    k: int
    block: int


def quantize_per_channel(w: np.ndarray) -> PerChannelInt8:
    """w: float [N, K] (out, in)."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return PerChannelInt8(np.ascontiguousarray(q.T), scale)


def quantize_blocks(w: np.ndarray, block: int = NBITS_BLOCK) -> BlockInt8:
    """w: float [N, K] (out, in); K is zero-padded up to a whole number of blocks."""
    n, k = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n, n_blocks * block), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block)
    amax = np.abs(blocks).max(axis=2)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
    return BlockInt8(q.astype(np.uint8), scale, k, block)


@dataclass
class BlockInt4:
    blob: np.ndarray  # uint8 [N, n_blocks, block / 2]: two 4-bit levels a byte, the first in the low nibble
    scale: np.ndarray  # float32 [N, n_blocks]
    offset: np.ndarray  # float32 [n_blocks, N]: w = (level - 8) * scale + offset, per block and output
    k: int
    block: int


def quantize_blocks4(w: np.ndarray, block: int = NBITS_BLOCK) -> BlockInt4:
    """w: float [N, K] (out, in); K must be a whole number of blocks. Each block's 16 levels
    span its minimum to its maximum (llama.cpp's Q4_1 rule), so weights from a Q4_1 GGUF
    (blocks of 32 along K, too) come back exactly. MatMulNBits runs integer zero points fast
    but float ones ~100x slower, so the block's offset is kept apart: the graph adds
    (x summed per block) @ offset."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"int4: input size {k} is not a multiple of the block ({block})")
    blocks = w.reshape(n, k // block, block)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    offset = (lo + 8 * scale).astype(np.float32)  # MatMulNBits' default zero point is 8
    return BlockInt4((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale, np.ascontiguousarray(offset.T), k, block)


def with_block_sums(q4: BlockInt4) -> tuple[np.ndarray, np.ndarray]:
    """(blob, scale) of q4's weights followed by one output per block that sums the input over
    that block: level 9 (weight 1) in its block, level 8 (weight 0) elsewhere, scale 1. One
    MatMulNBits then gives the product and the block sums the offsets need, both from the same
    int8-quantized activations, as llama.cpp's Q4_1 x Q8_1 dot product takes its block sums."""
    n_blocks = q4.k // q4.block
    sums = np.full((n_blocks, n_blocks, q4.block // 2), 0x88, np.uint8)
    sums[np.arange(n_blocks), np.arange(n_blocks)] = 0x99
    return np.concatenate([q4.blob, sums]), np.concatenate([q4.scale, np.ones((n_blocks, n_blocks), np.float32)])
