"""The tensorrt graph flavour as far as a machine without TensorRT can check it: every node is an
operator TensorRT 10's ONNX parser supports, with attributes and constant inputs it accepts;
`edge-runtime build --flavour tensorrt` writes it; and on the default model it matches
transformers (the tiny architectures' parity is in test_builder_parity.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.builder.checkpoint import files_sha256
from edge_runtime.cli import main
from edge_runtime.engine import LocalModel
from edge_runtime.manifest import read_manifest
from logit_metrics import mean_kl
from test_default_model import TEXT, _ref_logits, reference  # noqa: F401 (reference is a fixture)

TARGET_TENSORRT = "10.3"  # JetPack 6.1 / 6.2
OPSET = 17  # inside the opset range operators.md gives for TensorRT 10.x (9 to 20)

# TensorRT 10.3's ONNX operator support, from onnx-tensorrt's docs/operators.md (branch
# release/10.3-GA): the operators this graph needs, each with the attributes the parser honours
# for it. Any other operator, or a custom domain (com.microsoft), fails the check.
TRT_SUPPORTED: dict[str, set[str]] = {
    "Add": set(), "Sub": set(), "Mul": set(), "Pow": set(), "Sqrt": set(), "Reciprocal": set(),
    "Sigmoid": set(), "Greater": set(), "Where": set(), "Identity": set(), "Shape": set(),
    "MatMul": set(), "Expand": set(), "Tile": set(), "Unsqueeze": set(),
    "Cast": {"to"},
    "Concat": {"axis"},
    "DequantizeLinear": {"axis"},
    "Gather": {"axis"},
    "ReduceMean": {"axes", "keepdims"},
    "Reshape": set(),  # allowzero left at 0
    "ScatterElements": {"axis"},  # reduction left at "none"
    "Slice": set(),
    "Softmax": {"axis"},
    "Split": {"axis"},
    "Transpose": {"perm"},
}
# Inputs the parser needs as initialisers (docs/operators.md restrictions), by operator.
CONSTANT_INPUTS = {"DequantizeLinear": (0, 1), "Unsqueeze": (1,), "Split": (1,), "Reshape": (1,), "Tile": (1,)}
CAST_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL}


def trt_violations(model: onnx.ModelProto) -> list[str]:
    """What in the graph TensorRT 10.3's parser would refuse (empty: nothing)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    found = [f"opset import {o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import if (o.domain, o.version) != ("", OPSET)]
    for node in graph.node:
        where = f"{node.name} ({node.op_type})"
        if node.domain or node.op_type not in TRT_SUPPORTED:
            found.append(f"{where}: not a TensorRT operator")
            continue
        extra = {a.name for a in node.attribute} - TRT_SUPPORTED[node.op_type]
        if extra:
            found.append(f"{where}: attributes {sorted(extra)}")
        for i in CONSTANT_INPUTS.get(node.op_type, ()):
            if node.input[i] not in inits:
                found.append(f"{where}: input {i} is not an initialiser")
        if node.op_type == "Cast" and onnx.helper.get_attribute_value(node.attribute[0]) not in CAST_TYPES:
            found.append(f"{where}: cast to an unsupported type")
        if node.op_type == "DequantizeLinear":
            q, scale = (inits.get(n) for n in node.input[:2])
            if len(node.input) > 2:
                found.append(f"{where}: zero point given (TensorRT takes symmetric scales only)")
            if q is not None and scale is not None:
                axis = onnx.helper.get_attribute_value(node.attribute[0]) if node.attribute else 1
                if q.data_type != TensorProto.INT8 or scale.data_type != TensorProto.FLOAT:
                    found.append(f"{where}: not int8 weights with float scales")
                elif list(scale.dims) not in ([], [q.dims[axis]]):
                    found.append(f"{where}: scales neither per tensor nor per channel")
    for t in graph.initializer:
        if t.data_type == TensorProto.INT8 and not any(n.op_type == "DequantizeLinear" and n.input[0] == t.name for n in graph.node):
            found.append(f"initialiser {t.name}: int8 outside a DequantizeLinear")
        if t.data_type == TensorProto.DOUBLE:
            found.append(f"initialiser {t.name}: float64")
    return found


@pytest.fixture(scope="module")
def trt_builds(tiny_checkpoints, tmp_path_factory):
    """glm (partial interleaved rotary, qkv bias, untied head) as INT8 and llama (tied
    embeddings) in both precisions."""
    out = tmp_path_factory.mktemp("trt")
    return {
        (arch, quant): build(tiny_checkpoints[arch][0], out / f"{arch}-{quant}", BuildOptions(quant=quant, flavour="tensorrt"), quiet=True)
        for arch, quant in (("glm", "int8"), ("glm4", "int8"), ("llama", "int8"), ("llama", "fp32"))
    }


@pytest.mark.parametrize("key", [("glm", "int8"), ("glm4", "int8"), ("llama", "int8"), ("llama", "fp32")])
def test_every_node_is_a_tensorrt_operator(trt_builds, key):
    model = onnx.load(trt_builds[key] / "model.onnx")
    assert trt_violations(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert ("DequantizeLinear" in ops) == (key[1] == "int8")
    assert {"ScatterElements", "Softmax", "MatMul"} <= ops
    # Batch and sequence axes stay dynamic (the optimisation profile sets their ranges).
    ids = next(i for i in model.graph.input if i.name == "input_ids")
    assert [d.dim_param for d in ids.type.tensor_type.shape.dim] == ["batch", "sequence_length"]


def test_the_ort_flavour_fails_the_check(tiny_model_dir):
    """The check can fail: ONNX Runtime's graph, with its contrib operators, does."""
    found = trt_violations(onnx.load(tiny_model_dir / "model.onnx"))
    assert any("GroupQueryAttention" in f for f in found)
    assert any("com.microsoft" in f for f in found)


def test_int8_weights_are_int8_on_disk(trt_builds):
    """The INT8 build stores its matrices as int8 with one float scale per output channel."""
    model = onnx.load(trt_builds["glm", "int8"] / "model.onnx")
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layers.0.qkv.qweight"))
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layers.0.qkv.scale"))
    assert weight.dtype == np.int8 and scale.shape == (weight.shape[1],)
    fp32 = (trt_builds["llama", "fp32"] / "model.onnx.data").stat().st_size
    assert (trt_builds["llama", "int8"] / "model.onnx.data").stat().st_size < fp32 / 3


def test_cli_builds_the_tensorrt_flavour(tiny_checkpoints, tmp_path, capsys):
    assert main(["build", str(tiny_checkpoints["glm"][0]), "-o", str(tmp_path / "m"), "--flavour", "tensorrt"]) == 0
    manifest = read_manifest(tmp_path / "m")
    assert (manifest["flavour"], manifest["quantization"]) == ("tensorrt", "qdq")
    assert manifest["graph_sha256"] == files_sha256([tmp_path / "m" / "model.onnx", tmp_path / "m" / "model.onnx.data"])
    capsys.readouterr()
    assert main(["build", str(tiny_checkpoints["glm"][0]), "-o", str(tmp_path / "n"), "--flavour", "tensorrt", "--int8-form", "nbits"]) == 2
    assert "int8/nbits for the tensorrt flavour (INT8 forms: qdq)" in capsys.readouterr().err


def test_flavours_are_separate_builds(tiny_checkpoints, tmp_path):
    """The same source and output directory with the other flavour is rebuilt, not reused."""
    ckpt = tiny_checkpoints["llama"][0]
    build(ckpt, tmp_path / "m", BuildOptions(quant="fp32"), quiet=True)
    build(ckpt, tmp_path / "m", BuildOptions(quant="fp32", flavour="tensorrt"), quiet=True)
    assert read_manifest(tmp_path / "m")["flavour"] == "tensorrt"


# -- the default model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_default_builds(smollm_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm-trt")
    return {q: build(smollm_gguf, root / q, BuildOptions(quant=q, max_context=512, flavour="tensorrt"), quiet=True) for q in ("fp32", "int8")}


def test_default_model_tensorrt_flavour_matches_transformers(trt_default_builds, reference):
    ids = LocalModel(trt_default_builds["fp32"]).tokenizer.encode(TEXT)
    ref = _ref_logits(reference, ids)
    for quant, model_dir in trt_default_builds.items():
        backend = OnnxRuntimeBackend(model_dir, max_batch=1)
        ours = backend.prefill_logits(backend.allocate(), np.array(ids))
        if quant == "fp32":
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        else:
            kl = mean_kl(ref, ours)
            print(f"default model tensorrt int8 mean KL {kl:.2e}")
            assert kl < 0.03  # the ort flavour's bound (test_default_model.py)
            assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.85
