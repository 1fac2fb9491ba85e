"""Write the ONNX Runtime decoder graph: one graph for prefill and decode, KV cache as explicit
inputs/outputs, ONNX Runtime's fused decoder operators (GroupQueryAttention with built-in
rotary, SkipSimplifiedLayerNormalization, DynamicQuantizeMatMul / MatMulNBits).

Inputs:  input_ids int64 [B,S]; seqlens_k int32 [B] (tokens in the cache after this step, - 1);
         total_sequence_length int32 [] (max over the batch); logits_index int64 [K] (positions
         whose logits are wanted, usually just the last); past_key_values.{i}.key|value.
Outputs: logits float32 [B,K,V]; present.{i}.key|value.
When past and present are bound to the same buffer (of max_context length), attention writes
the new KV in place (GroupQueryAttention's shared-buffer mode).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .quantize import (
    BlockInt8,
    PerChannelInt8,
    quantize_blocks,
    quantize_blocks4,
    quantize_per_channel,
    with_block_sums,
)
from .spec import ModelSpec

MS = "com.microsoft"
OPSET = 17


def rope_cache(spec: ModelSpec, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, rotary_dim/2] as GroupQueryAttention wants them."""
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = spec.rope_scaling
    if "freq_factors" in scaling:  # from a GGUF: llama.cpp divides each frequency by its factor
        inv_freq = inv_freq / np.asarray(scaling["freq_factors"], dtype=np.float64)
    if "linear_factor" in scaling:
        inv_freq = inv_freq / scaling["linear_factor"]
    if "factor" in scaling:  # from a Hugging Face config: Llama 3's parameters
        inv_freq = _llama3_scaled(inv_freq, scaling)
    freqs = np.outer(np.arange(max_context, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def check_fused_attention(spec: ModelSpec) -> None:
    """Refuse, at build time, attention shapes ONNX Runtime's GroupQueryAttention cannot run
    on the CPU (it would fail at the first generate otherwise)."""
    problems = []
    if spec.head_dim % 16:
        problems.append(f"head_dim {spec.head_dim} is not a multiple of 16")
    if (spec.rotary_dim // 2) % 8 or spec.rotary_dim > spec.head_dim:
        problems.append(f"the rotary half-width {spec.rotary_dim // 2} (rotary_dim {spec.rotary_dim} / 2) is not a multiple of 8 "
                        f"no larger than head_dim / 2")
    if problems:
        raise CheckpointError("this model's attention shape cannot run on ONNX Runtime's fused GroupQueryAttention: "
                              + "; ".join(problems))


def _llama3_scaled(inv_freq: np.ndarray, s: dict[str, float]) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling (as transformers computes it)."""
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen = old_ctx / s["low_freq_factor"]
    high_wavelen = old_ctx / s["high_freq_factor"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


class GraphWriter:
    """Emits the nodes of one graph flavour; build_graph drives it layer by layer. This one
    writes ONNX Runtime's fused operators (trt_graph.py subclasses it with standard ops)."""

    OPSETS = {"": OPSET, MS: 1}

    def __init__(self, quant: str) -> None:
        self.quant = quant  # "fp32" | "dq" | "nbits" | "int4" | "int4-head4"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._const_names: set[str] = set()
        self._n = 0

    def const(self, name: str, arr: np.ndarray) -> str:
        if name not in self._const_names:  # shared small constants (axes, shapes) are added once
            self._const_names.add(name)
            self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        self._n += 1
        outs = [f"{op_type}_{self._n}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def linear(self, name: str, x: str, w: np.ndarray, bias: np.ndarray | None = None, int8: bool = False) -> str:
        """x @ w.T (+ bias); w is [out, in]. int8: 8-bit blocks even in an INT4 build."""
        n, k = w.shape
        if self.quant == "dq":
            q = quantize_per_channel(w)
            inputs = [x, self.const(f"{name}.qweight", q.weight), self.const(f"{name}.scale", q.scale)]
            if bias is not None:
                inputs += ["", self.const(f"{name}.bias", bias.astype(np.float32))]
            return self.op1("DynamicQuantizeMatMul", inputs, domain=MS)
        if self.quant.startswith("int4") and not int8:
            q4 = quantize_blocks4(w)
            blob, scale = with_block_sums(q4)
            n_blocks = k // q4.block
            product_and_sums = self.op1(
                "MatMulNBits", [x, self.const(f"{name}.qweight", blob), self.const(f"{name}.scale", scale.reshape(-1))],
                domain=MS, K=k, N=n + n_blocks, bits=4, block_size=q4.block, accuracy_level=4,
            )
            y, block_sums = self.op("Split", [product_and_sums, self.const(f"split_{n}_{n_blocks}", np.array([n, n_blocks]))], 2, axis=-1)
            y = self.op1("Add", [y, self.op1("MatMul", [block_sums, self.const(f"{name}.offset", q4.offset)])])
        elif self.quant in ("nbits", "int4", "int4-head4"):
            q = quantize_blocks(w)
            y = self.op1(
                "MatMulNBits",
                [x, self.const(f"{name}.qweight", q.blob), self.const(f"{name}.scale", q.scale.reshape(-1))],
                domain=MS, K=k, N=n, bits=8, block_size=q.block, accuracy_level=4,
            )
        else:
            y = self.op1("MatMul", [x, self.const(f"{name}.weight", np.ascontiguousarray(w.T))])
        if bias is not None:
            y = self.op1("Add", [y, self.const(f"{name}.bias", bias.astype(np.float32))])
        return y

    def rms_norm(self, x: str, w: np.ndarray, name: str, eps: float) -> str:
        return self.op1("SimplifiedLayerNormalization", [x, self.const(name, w)], axis=-1, epsilon=eps, stash_type=1)

    def skip_rms_norm(self, x: str, skip: str, w: np.ndarray, name: str, eps: float) -> tuple[str, str]:
        """(norm(x + skip), x + skip)."""
        outs = self.op("SkipSimplifiedLayerNormalization", [x, skip, self.const(name, w)], 4, MS, epsilon=eps)
        return outs[0], outs[3]

    def embedding(self, ids: str, embed: np.ndarray, hidden: int) -> tuple[str, PerChannelInt8 | BlockInt8 | None]:
        """Token embeddings; for INT8 the table is stored quantized and dequantized per looked-up
        row. Returns the quantized table too, so a tied lm_head can reuse it."""
        if self.quant == "fp32":
            return self.op1("Gather", [self.const("embed.weight", embed), ids]), None
        if self.quant in ("nbits", "int4", "int4-head4"):  # INT4 keeps an 8-bit table: a lookup reads one row
            q = quantize_blocks(embed)
            rows = self.op1("Gather", [self.const("embed.qweight", q.blob), ids])  # [B,S,nb,blk]
            scale = self.op1("Gather", [self.const("embed.scale2d", q.scale), ids])  # [B,S,nb]
            centred = self.op1("Sub", [self.op1("Cast", [rows], to=TensorProto.FLOAT), self.const("u8_zero", np.float32(128))])
            deq = self.op1("Mul", [centred, self.op1("Unsqueeze", [scale, self.const("axes_last", np.array([-1]))])])
            flat = self.op1("Reshape", [deq, self.const("shape_bs_h", np.array([0, 0, -1]))])
            if q.k != q.blob.shape[1] * q.block:
                flat = self.op1("Slice", [flat, self.const("zero1", np.array([0])), self.const("h1", np.array([hidden])), self.const("axes_last", np.array([-1]))])
            return flat, q
        q = quantize_per_channel(embed)  # weight [H, V]: one copy serves the lookup and lm_head
        cols = self.op1("Gather", [self.const("embed.qweight", q.weight), ids], axis=1)  # [H,B,S]
        rows = self.op1("Transpose", [cols], perm=[1, 2, 0])
        scale = self.op1("Gather", [self.const("embed.scale", q.scale), ids])
        deq = self.op1("Mul", [self.op1("Cast", [rows], to=TensorProto.FLOAT), self.op1("Unsqueeze", [scale, self.const("axes_last", np.array([-1]))])])
        return deq, q

    def tied_lm_head(self, x: str, q: PerChannelInt8 | BlockInt8, vocab: int, hidden: int) -> str:
        if isinstance(q, BlockInt8):
            return self.op1(
                "MatMulNBits", [x, "embed.qweight", self.const("embed.scale", q.scale.reshape(-1))],
                domain=MS, K=hidden, N=vocab, bits=8, block_size=q.block, accuracy_level=4,
            )
        return self.op1("DynamicQuantizeMatMul", [x, "embed.qweight", "embed.scale"], domain=MS)

    def check_attention(self, spec: ModelSpec) -> None:
        """Refuse, at build time, an attention shape this flavour cannot run."""
        check_fused_attention(spec)

    def qkv_weights(self, ckpt: Checkpoint, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Layer i's fused q/k/v projection: weight [q+k+v, hidden] and bias (or None)."""
        w = np.concatenate([ckpt.weight(f"l{i}.{n}") for n in "qkv"], axis=0)
        b = np.concatenate([ckpt.weight(f"l{i}.{n}_bias") for n in "qkv"], axis=0) if ckpt.spec.qkv_bias else None
        return w, b

    def attention(self, spec: ModelSpec, name: str, qkv: str, past: tuple[str, str], present: tuple[str, str]) -> str:
        """Rotary + causal attention over the cache; writes the new keys/values into present."""
        out = f"{name}_out"
        self.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", *past, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [out, *present], name=name, domain=MS,
            num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1,
            rotary_interleaved=int(spec.rope_interleaved), scale=float(spec.head_dim ** -0.5),
        ))
        return out


KV_DTYPES = {"fp16": (TensorProto.FLOAT16, np.float16), "fp32": (TensorProto.FLOAT, np.float32)}


def build_graph(
    ckpt: Checkpoint, quant: str, max_context: int, progress: Callable[[int, int], None] | None = None,
    kv_dtype: str = "fp32",
    writer: Callable[[str], GraphWriter] = GraphWriter,
) -> onnx.ModelProto:
    """quant: "fp32" or one of the writer's weight forms (this module's: "dq" or "nbits", the two INT8
    forms, "int4" (4-bit layers, 8-bit embedding and lm_head) or "int4-head4" (the lm_head in 4 bits
    too)). kv_dtype: the KV cache's element type; attention runs in it (GroupQueryAttention wants its
    inputs and cache in one type), everything else in float32."""
    spec = ckpt.spec
    g = writer(quant)
    g.check_attention(spec)
    kv_proto, kv_np = KV_DTYPES[kv_dtype]
    eps = spec.rms_norm_eps
    kv_shape = ["batch", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    present_shape = ["batch", spec.num_kv_heads, "total_sequence_length", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["num_logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "num_logits", spec.vocab_size])]
    cos, sin = rope_cache(spec, max_context)
    g.const("cos_cache", cos.astype(kv_np))
    g.const("sin_cache", sin.astype(kv_np))

    embed = ckpt.weight("embed")
    x, quantized_embed = g.embedding("input_ids", embed, spec.hidden_size)
    residual = None
    for i in range(spec.num_layers):
        p = f"layers.{i}"
        if residual is None:
            normed, residual = g.rms_norm(x, ckpt.weight(f"l{i}.attn_norm"), f"{p}.attn_norm", eps), x
        else:
            normed, residual = g.skip_rms_norm(x, residual, ckpt.weight(f"l{i}.attn_norm"), f"{p}.attn_norm", eps)
        qkv = g.linear(f"{p}.qkv", normed, *g.qkv_weights(ckpt, i))
        if kv_proto != TensorProto.FLOAT:
            qkv = g.op1("Cast", [qkv], to=kv_proto)
        past = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present = f"present.{i}.key", f"present.{i}.value"
        inputs += [helper.make_tensor_value_info(n, kv_proto, kv_shape) for n in past]
        outputs += [helper.make_tensor_value_info(n, kv_proto, present_shape) for n in present]
        attn = g.attention(spec, f"{p}.attn", qkv, past, present)
        if kv_proto != TensorProto.FLOAT:
            attn = g.op1("Cast", [attn], to=TensorProto.FLOAT)
        o = g.linear(f"{p}.o", attn, ckpt.weight(f"l{i}.o"))
        if spec.arch == "glm4":
            o = g.rms_norm(o, ckpt.weight(f"l{i}.post_attn_norm"), f"{p}.post_attn_norm", eps)
        normed, residual = g.skip_rms_norm(o, residual, ckpt.weight(f"l{i}.mlp_norm"), f"{p}.mlp_norm", eps)
        gate_up = g.linear(f"{p}.gate_up", normed, np.concatenate([ckpt.weight(f"l{i}.gate"), ckpt.weight(f"l{i}.up")]))
        gate, up = g.op("Split", [gate_up, g.const(f"{p}.split", np.array([spec.intermediate_size] * 2))], 2, axis=-1)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        x = g.linear(f"{p}.down", act, ckpt.weight(f"l{i}.down"))
        if spec.arch == "glm4":
            x = g.rms_norm(x, ckpt.weight(f"l{i}.post_mlp_norm"), f"{p}.post_mlp_norm", eps)
        if progress:
            progress(i + 1, spec.num_layers)

    final, _ = g.skip_rms_norm(x, residual, ckpt.weight("norm"), "final_norm", eps)
    picked = g.op1("Gather", [final, "logits_index"], axis=1)
    if spec.tie_word_embeddings and quantized_embed is not None and quant != "int4-head4":
        logits = g.tied_lm_head(picked, quantized_embed, spec.vocab_size, spec.hidden_size)
    else:
        lm_head = embed if spec.tie_word_embeddings else ckpt.weight("lm_head")
        logits = g.linear("lm_head", picked, lm_head, int8=quant == "int4")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    graph = helper.make_graph(g.nodes, f"{spec.arch}_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in g.OPSETS.items()])
    model.ir_version = 8
    return model

