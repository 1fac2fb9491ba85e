"""The TensorRT flavour of the decoder graph: the same inputs, outputs and KV-cache semantics as
onnx_graph.py's, written with standard ONNX operators only (opset 17), so that TensorRT 10's ONNX
parser takes the whole graph (ONNX Runtime's contrib operators are not TensorRT layers).

- INT8 ("qdq"): int8 weight initialisers with per-output-channel scales, each read through a
  DequantizeLinear into its MatMul, the explicit-quantization form TensorRT fuses into INT8-weight
  GEMMs. Per channel, not per block: TensorRT 10 takes block-wise DequantizeLinear for INT4 only.
  Activations stay in floating point (no calibration data, so no activation scales).
- Attention: rotary from cos/sin tables gathered at each token's position, the new keys/values
  written into the cache buffer with ScatterElements at those positions (so past and present may
  be one buffer, as with GroupQueryAttention), then a causal-masked softmax over the first
  total_sequence_length cached positions. Query heads are grouped per KV head by a reshape,
  never by copying the cache.
- GLM's interleaved rotary becomes Llama's half rotation by permuting the rotary rows of the q
  and k weights at build time: q.k is unchanged when both are permuted alike, and V is not
  touched. The cached keys are then in the permuted order, which only this graph reads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from .checkpoint import Checkpoint
from .onnx_graph import OPSET, GraphWriter, build_graph
from .quantize import PerChannelInt8, quantize_per_channel
from .spec import ModelSpec

TRT_QUANTS = ("fp32", "qdq")


def half_rotation_order(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Row order within one head that turns interleaved rotary pairs (2i, 2i+1) into halves
    (i, rotary_dim/2 + i); the rows past rotary_dim stay where they are."""
    return np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2), np.arange(rotary_dim, head_dim)])


class TrtGraphWriter(GraphWriter):
    OPSETS = {"": OPSET}

    def __init__(self, quant: str, max_context: int) -> None:
        if quant not in TRT_QUANTS:
            raise ValueError(f"tensorrt flavour quantization must be one of {TRT_QUANTS}, got {quant!r}")
        super().__init__(quant)
        self._max_context = max_context  # longest position range the graph slices from a constant
        self._positions: tuple[str, str, str] | None = None

    # -- weights --------------------------------------------------------------------------

    def _dequantized(self, name: str, q: PerChannelInt8) -> str:
        """The float [K, N] weight read from its int8 initialiser and per-column scales."""
        return self.op1("DequantizeLinear", [self.const(f"{name}.qweight", q.weight), self.const(f"{name}.scale", q.scale)], axis=1)

    def linear(self, name: str, x: str, w: np.ndarray, bias: np.ndarray | None = None, int8: bool = False) -> str:
        # (int8: this flavour's weights are all 8-bit already)
        if self.quant == "fp32":
            return super().linear(name, x, w, bias)
        y = self.op1("MatMul", [x, self._dequantized(name, quantize_per_channel(w))])
        if bias is not None:
            y = self.op1("Add", [y, self.const(f"{name}.bias", bias.astype(np.float32))])
        return y

    def embedding(self, ids: str, embed: np.ndarray, hidden: int) -> tuple[str, PerChannelInt8 | None]:
        if self.quant == "fp32":
            return super().embedding(ids, embed, hidden)
        q = quantize_per_channel(embed)  # [H, V]: one table serves the lookup and a tied lm_head
        rows = self.op1("Transpose", [self._dequantized("embed", q)], perm=[1, 0])
        return self.op1("Gather", [rows, ids]), q

    def tied_lm_head(self, x: str, q: PerChannelInt8, vocab: int, hidden: int) -> str:
        # A DequantizeLinear of its own over the shared int8 table: TensorRT fuses a DQ into the
        # one layer that reads it.
        return self.op1("MatMul", [x, self._dequantized("embed", q)])

    def check_attention(self, spec: ModelSpec) -> None:
        """Plain MatMul/Softmax attention takes any head size and rotary width."""

    def qkv_weights(self, ckpt: Checkpoint, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        w, b = super().qkv_weights(ckpt, i)
        spec = ckpt.spec
        if not spec.rope_interleaved:
            return w, b
        order = half_rotation_order(spec.head_dim, spec.rotary_dim)
        heads = spec.num_heads + spec.num_kv_heads  # q heads then k heads; v rows keep their order
        rows = np.concatenate([h * spec.head_dim + order for h in range(heads)] + [np.arange(heads * spec.head_dim, w.shape[0])])
        return w[rows], None if b is None else b[rows]

    # -- norms ----------------------------------------------------------------------------

    def rms_norm(self, x: str, w: np.ndarray, name: str, eps: float) -> str:
        # Pow + ReduceMean is the pattern ONNX Runtime's trt_layer_norm_fp32_fallback keeps in
        # fp32: squared activations overflow fp16.
        mean_sq = self.op1("ReduceMean", [self.op1("Pow", [x, self.const("two", np.float32(2))])], axes=[-1], keepdims=1)
        inv = self.op1("Reciprocal", [self.op1("Sqrt", [self.op1("Add", [mean_sq, self.const(f"eps_{eps}", np.float32(eps))])])])
        return self.op1("Mul", [self.op1("Mul", [x, inv]), self.const(name, w)])

    def skip_rms_norm(self, x: str, skip: str, w: np.ndarray, name: str, eps: float) -> tuple[str, str]:
        total = self.op1("Add", [x, skip])
        return self.rms_norm(total, w, name, eps), total

    # -- attention ------------------------------------------------------------------------

    def _arange(self, n: str) -> str:
        """[0, n) as int64, sliced from a constant (n: a [1] int64 tensor)."""
        return self.op1("Slice", [self.const("arange", np.arange(self._max_context, dtype=np.int64)), self.const("zero1", np.array([0])), n])

    def _position_inputs(self) -> tuple[str, str, str]:
        """(positions [B,S] int64, cos [B,1,S,R/2], sin [B,1,S,R/2]), made once per graph: the
        new tokens of row b sit at seqlens_k[b] + 1 - S + s, as GroupQueryAttention places them."""
        if self._positions is None:
            seq = self.op1("Slice", [self.op1("Shape", ["input_ids"]), self.const("one1", np.array([1])), self.const("two1", np.array([2]))])
            first = self.op1("Sub", [self.op1("Cast", ["seqlens_k"], to=TensorProto.INT64), self.op1("Sub", [seq, self.const("one1", np.array([1]))])])
            pos = self.op1("Add", [self.op1("Unsqueeze", [first, self.const("axes_last", np.array([-1]))]), self._arange(seq)])
            cos, sin = (self.op1("Unsqueeze", [self.op1("Gather", [table, pos]), self.const("one1", np.array([1]))]) for table in ("cos_cache", "sin_cache"))
            self._positions = pos, cos, sin
        return self._positions

    def _heads(self, x: str, heads: int, dim: int) -> str:
        """[B, S, heads*dim] -> [B, heads, S, dim]."""
        split = self.op1("Reshape", [x, self.const(f"shape_heads_{heads}", np.array([0, 0, heads, dim]))])
        return self.op1("Transpose", [split], perm=[0, 2, 1, 3])

    def _rotate(self, x: str, spec: ModelSpec, cos: str, sin: str) -> str:
        """Half rotation of the first rotary_dim features of each head (interleaved GLM weights
        are permuted into this order by qkv_weights)."""
        half, rest = spec.rotary_dim // 2, spec.head_dim - spec.rotary_dim
        sizes = [half, half] + ([rest] if rest else [])
        parts = self.op("Split", [x, self.const(f"rope_split_{rest}", np.array(sizes))], len(sizes), axis=-1)
        x1, x2 = parts[0], parts[1]
        r1 = self.op1("Sub", [self.op1("Mul", [x1, cos]), self.op1("Mul", [x2, sin])])
        r2 = self.op1("Add", [self.op1("Mul", [x2, cos]), self.op1("Mul", [x1, sin])])
        return self.op1("Concat", [r1, r2, *parts[2:]], axis=-1)

    def attention(self, spec: ModelSpec, name: str, qkv: str, past: tuple[str, str], present: tuple[str, str]) -> str:
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        pos, cos, sin = self._position_inputs()
        q, k, v = self.op("Split", [qkv, self.const(f"qkv_split_{heads}_{kv_heads}", np.array([heads * dim, kv_heads * dim, kv_heads * dim]))], 3, axis=-1)
        q = self._rotate(self._heads(q, heads, dim), spec, cos, sin)
        k = self._rotate(self._heads(k, kv_heads, dim), spec, cos, sin)
        v = self._heads(v, kv_heads, dim)
        # Write the new keys/values at their positions along the cache's length axis.
        where = self.op1("Expand", [self.op1("Unsqueeze", [pos, self.const("axes_1_3", np.array([1, 3]))]), self.op1("Shape", [k])])
        for cache, new, out in zip(past, (k, v), present):
            self.nodes.append(onnx.helper.make_node("ScatterElements", [cache, where, new], [out], name=f"{out}.write", axis=2))
        total = self.op1("Reshape", [self.op1("Cast", ["total_sequence_length"], to=TensorProto.INT64), self.const("shape_1", np.array([1]))])
        keys, values = (self.op1("Slice", [c, self.const("zero1", np.array([0])), total, self.const("axis2", np.array([2]))]) for c in present)
        # Query heads that share a KV head become one [group * S] block of rows: no KV copies.
        group = heads // kv_heads
        scaled = self.op1("Mul", [q, self.const(f"scale_{dim}", np.float32(dim ** -0.5))])
        grouped = self.op1("Reshape", [scaled, self.const(f"shape_groups_{kv_heads}", np.array([0, kv_heads, -1, dim]))])
        scores = self.op1("MatMul", [grouped, self.op1("Transpose", [keys], perm=[0, 1, 3, 2])])  # [B, KVH, G*S, T]
        future = self.op1("Greater", [self._arange(total), self.op1("Unsqueeze", [pos, self.const("axes_last", np.array([-1]))])])  # [B,S,T]
        future = self.op1("Tile", [self.op1("Unsqueeze", [future, self.const("one1", np.array([1]))]), self.const(f"tile_{group}", np.array([1, 1, group, 1]))])
        masked = self.op1("Where", [future, self.const("neg_inf", np.float32(-np.inf)), scores])
        ctx = self.op1("MatMul", [self.op1("Softmax", [masked], axis=-1), values])  # [B, KVH, G*S, D]
        ctx = self.op1("Reshape", [ctx, self.const(f"shape_ctx_{heads}", np.array([0, heads, -1, dim]))])
        ctx = self.op1("Transpose", [ctx], perm=[0, 2, 1, 3])
        return self.op1("Reshape", [ctx, self.const("shape_bs_h", np.array([0, 0, -1]))])


def build_trt_graph(
    ckpt: Checkpoint, quant: str, max_context: int, progress: Callable[[int, int], None] | None = None,
    kv_dtype: str = "fp32",
) -> onnx.ModelProto:
    """quant: "fp32" or "qdq" (INT8 weights through DequantizeLinear); the KV cache in fp32
    (BuildOptions refuses another kv_dtype for this flavour)."""
    return build_graph(ckpt, quant, max_context, progress, kv_dtype, writer=lambda q: TrtGraphWriter(q, max_context))
