"""Explicit device selection (backends/providers.py): the `[engine] device` key, clear refusals
where providers or room are missing, and the TensorRT provider's options as assembled from the
config, the model and the GPU's facts (given here as a GpuInfo, as probe_gpu reads them)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.backends.providers import (
    CPU, DeviceError, DevicePlan, GpuInfo, Shapes, check_profile, plan_device, profile_shapes, tensorrt_options,
    version_string,
)
from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.builder.spec import ModelSpec
from edge_runtime.config import EngineConfig, load_config
from edge_wire.settings import ConfigError
from edge_runtime.manifest import read_manifest

ORIN = GpuInfo("Orin (nvgpu)", (8, 7), 8 << 30, 102.4e9)
SHAPES = Shapes(max_batch=4, prefill_chunk=64, max_context=256)


@pytest.fixture(scope="module")
def trt_model(tiny_checkpoints, tmp_path_factory) -> Path:
    return build(tiny_checkpoints["glm"][0], tmp_path_factory.mktemp("dev") / "glm", BuildOptions(flavour="tensorrt"), quiet=True)


def test_device_key_is_read_and_checked(tmp_path):
    assert EngineConfig().device == "cpu"
    path = tmp_path / "config.toml"
    path.write_text('[engine]\ndevice = "tensorrt"\ntrt_workspace_mb = 2048\n')
    assert (load_config(path).device, load_config(path).trt_workspace_mb) == ("tensorrt", 2048)
    path.write_text('[engine]\ndevice = "gpu"\n')
    with pytest.raises(ConfigError, match=r"\[engine\] device: must be one of 'cpu', 'cuda', 'tensorrt', got 'gpu'"):
        load_config(path)


def test_cpu_device_runs_on_the_cpu_provider(tiny_model_dir):
    assert plan_device(EngineConfig(), tiny_model_dir) is CPU
    backend = OnnxRuntimeBackend(tiny_model_dir, max_batch=1, device=CPU)
    assert backend.session.get_providers() == ["CPUExecutionProvider"]
    assert backend.prefill(backend.allocate(), np.array([1, 2, 3])).shape == (backend.vocab_size,)


@pytest.mark.parametrize("device,provider", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_missing_provider_is_refused_by_name(device, provider, trt_model):
    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    with pytest.raises(DeviceError, match=f"device '{device}' needs {provider}, which this onnxruntime .* install onnxruntime-gpu"):
        plan_device(EngineConfig(device=device), trt_model)


def test_a_provider_that_does_not_start_is_refused(tiny_model_dir):
    """ONNX Runtime falls back to the next provider with only a warning; the plan refuses that."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime can start CUDAExecutionProvider")
    plan = DevicePlan("cuda", [("CUDAExecutionProvider", {"device_id": 0}), ("CPUExecutionProvider", {})])
    with pytest.raises(DeviceError, match=r"did not start CUDAExecutionProvider \(running on \['CPUExecutionProvider'\]\)"):
        OnnxRuntimeBackend(tiny_model_dir, max_batch=1, device=plan)


def test_profile_spans_decode_and_prefill_shapes(trt_model):
    spec = ModelSpec.from_dict(read_manifest(trt_model)["spec"])  # 2 layers, 2 KV heads of 32
    shapes = profile_shapes(spec, SHAPES)
    lo, opt, hi = (dict(item.split(":") for item in shapes[f"trt_profile_{w}_shapes"].split(",")) for w in ("min", "opt", "max"))
    assert set(lo) == {"input_ids", "seqlens_k", "logits_index", "total_sequence_length"} | {
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    assert (lo["total_sequence_length"], opt["total_sequence_length"], hi["total_sequence_length"]) == ("1", "256", "256")
    assert (lo["input_ids"], opt["input_ids"], hi["input_ids"]) == ("1x1", "4x1", "4x64")
    assert (lo["logits_index"], opt["logits_index"], hi["logits_index"]) == ("1", "1", "64")
    assert (lo["past_key_values.1.value"], opt["past_key_values.1.value"], hi["past_key_values.1.value"]) == ("1x2x1x32", "4x2x256x32", "4x2x256x32")


def test_tensorrt_options_and_cache_keys(trt_model, tmp_path):
    manifest = read_manifest(trt_model)

    def options(shapes=SHAPES, gpu=ORIN, trt="10.3.0", quantization="qdq"):
        return tensorrt_options({**manifest, "quantization": quantization}, shapes, 1 << 30, gpu, trt, "1.20.0", tmp_path)

    opts = options()
    assert opts["trt_fp16_enable"] and opts["trt_int8_enable"] and opts["trt_layer_norm_fp32_fallback"]
    assert opts["trt_max_workspace_size"] == 1 << 30
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    gpu_dir = tmp_path / "tensorrt" / "orin-nvgpu-sm87-trt10.3.0-ort1.20.0"
    assert opts["trt_timing_cache_path"] == str(gpu_dir)
    engine_dir = Path(opts["trt_engine_cache_path"])
    assert engine_dir.parent == gpu_dir and engine_dir.name.startswith(manifest["graph_sha256"][:16])
    assert not options(quantization="fp32")["trt_int8_enable"]
    # Another profile: another engine, the same timing cache. Another GPU or TensorRT: neither.
    bigger = options(shapes=dataclasses.replace(SHAPES, max_batch=8))
    assert bigger["trt_engine_cache_path"] != opts["trt_engine_cache_path"] and bigger["trt_timing_cache_path"] == str(gpu_dir)
    for other in (options(gpu=dataclasses.replace(ORIN, compute_capability=(8, 6))), options(trt="10.7.0")):
        assert not other["trt_engine_cache_path"].startswith(str(gpu_dir)) and other["trt_timing_cache_path"] != str(gpu_dir)


def test_profile_that_fits_is_accepted(trt_model):
    check_profile(read_manifest(trt_model), trt_model, SHAPES, 1 << 30, ORIN)


@pytest.mark.parametrize("change,reason", [
    ({"flavour": "ort"}, "built for the ort flavour, whose contrib operators TensorRT cannot take; build it with `edge-runtime build --flavour tensorrt`"),
    ({"max_context": 300}, "max_context 300 is past the 256 tokens the model was built for"),
    ({"prefill_chunk": 512}, "prefill_chunk 512 is longer than max_context 256"),
    ({"total_memory": 256 << 20}, r"needs 1026 MiB \(KV cache 1 MiB, weights 0 MiB, workspace 1024 MiB, attention scores 0 MiB\) but Orin \(nvgpu\) has 256 MiB"),
])
def test_profile_that_cannot_hold_the_shapes_is_refused(trt_model, change, reason):
    manifest = read_manifest(trt_model)
    if "flavour" in change:
        manifest = {**manifest, **change}
    shapes = dataclasses.replace(SHAPES, **{k: v for k, v in change.items() if k in ("max_context", "prefill_chunk")})
    gpu = dataclasses.replace(ORIN, **{k: v for k, v in change.items() if k == "total_memory"})
    with pytest.raises(DeviceError, match=reason):
        check_profile(manifest, trt_model, shapes, 1 << 30, gpu)


def test_tensorrt_version_numbers():
    assert version_string(100300) == "10.3.0"  # 10.x: major*10000 + minor*100 + patch
    assert version_string(8602) == "8.6.2"  # 8.x: major*1000 + minor*100 + patch


def test_serve_refuses_a_missing_device_at_start(tiny_model_dir, tmp_path):
    """`edge-runtime serve --device tensorrt` on a machine without the provider: one clear line, exit 2."""
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorrtExecutionProvider")
    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", str(tiny_model_dir), "--device", "tensorrt",
         "--socket", str(tmp_path / "e.sock")], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "edge-runtime: error: device 'tensorrt' needs TensorrtExecutionProvider" in done.stderr
    assert not (tmp_path / "e.sock").exists()
