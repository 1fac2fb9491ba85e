"""The INT4 form's pieces, run through ONNX Runtime's MatMulNBits itself: Q4_1 weights come
back exactly, and the extra outputs with_block_sums appends are the input's block sums."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.builder.quantize import quantize_blocks4, with_block_sums


def q4_1_weights(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Weights on a Q4_1 grid: per block of 32, min + level * scale, levels 0..15."""
    blocks = k // 32
    lo = rng.normal(-0.1, 0.02, (n, blocks, 1)).astype(np.float32)
    step = rng.uniform(0.005, 0.02, (n, blocks, 1)).astype(np.float32)
    levels = rng.integers(0, 16, (n, blocks, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # each block spans its whole range
    return (lo + levels * step).reshape(n, k).astype(np.float32)


def run_nbits(x: np.ndarray, blob: np.ndarray, scale: np.ndarray, k: int, n: int, accuracy_level: int) -> np.ndarray:
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(blob, "w"), numpy_helper.from_array(scale.reshape(-1), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_q4_1_weights_come_back_exactly():
    w = q4_1_weights(np.random.default_rng(0), 48, 96)
    q4 = quantize_blocks4(w)
    levels = np.stack([q4.blob & 0xF, q4.blob >> 4], axis=-1).reshape(48, 3, 32).astype(np.float32)
    back = (levels - 8) * q4.scale[..., None] + q4.offset.T[..., None]
    np.testing.assert_allclose(back.reshape(48, 96), w, rtol=0, atol=1e-6)


def test_block_sum_outputs_are_the_inputs_block_sums():
    rng = np.random.default_rng(1)
    n, k = 40, 128
    w = q4_1_weights(rng, n, k)
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    blob, scale = with_block_sums(quantize_blocks4(w))
    exact_sums = x.reshape(3, k // 32, 32).sum(axis=2)
    q4 = quantize_blocks4(w)
    # accuracy_level 4 quantizes each block of x to int8 (step amax/127): every element is off
    # by at most half a step, which bounds both the sums and the product.
    half_step = np.repeat(np.abs(x).reshape(3, k // 32, 32).max(axis=2) / 254, 32, axis=1)
    for accuracy_level, slack in ((1, 0.0), (4, 1.0)):
        out = run_nbits(x, blob, scale, k, n + k // 32, accuracy_level)
        sums_bound = slack * half_step.reshape(3, k // 32, 32).sum(axis=2) + 1e-4
        assert (np.abs(out[:, n:] - exact_sums) <= sums_bound).all()
        product = out[:, :n] + out[:, n:] @ q4.offset
        product_bound = slack * half_step @ np.abs(w).T + 1e-3
        assert (np.abs(product - x @ w.T) <= product_bound).all()
