"""Weight quantization in the forms ONNX Runtime runs fast on the CPU: two INT8 forms, and
INT4 for MatMulNBits.

- `nbits` (default): block-wise (32) symmetric 8-bit weights for `MatMulNBits` with
  accuracy_level 4, so activations are quantized per block too and the dot products run in int8.
- `dq`: per-output-channel int8 weights for `DynamicQuantizeMatMul` (activations quantized per
  tensor at run time). As fast at batch 1, but per-tensor activation scales lose too much on
  small LLMs (see bench/int8_forms.py for both, speed and logit divergence, on this machine).
- `int4`: block-wise (32) 4-bit weights for `MatMulNBits` (accuracy_level 4), each block's
  scale set by its largest-magnitude weight, which maps to -8 (llama.cpp's Q4_0 rule: all 16
  levels used).
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
    blob: np.ndarray  # uint8 [N, n_blocks, block / 2]: two weights a byte, the first in the low nibble; zero point 8
    scale: np.ndarray  # float32 [N, n_blocks]
    k: int
    block: int


def quantize_blocks4(w: np.ndarray, block: int = NBITS_BLOCK) -> BlockInt4:
    """w: float [N, K] (out, in); K is zero-padded up to a whole number of blocks."""
    n, k = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n, n_blocks * block), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block)
    # The signed weight of largest magnitude maps to -8, so the other side reaches 7 at most.
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = np.where(extreme != 0, extreme / -8.0, 1.0).astype(np.float32)
    q = (np.clip(np.rint(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    return BlockInt4((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale, k, block)
