"""The TensorRT and CUDA devices on a real GPU (`pytest -m gpu`): the tensorrt-flavour build run by
ONNX Runtime's TensorRT provider matches the same build on the CPU, its engine is built once and
reused from the cache, and the CUDA device runs the model too. Skipped, with the reason, where
this onnxruntime has no GPU providers or there is no GPU; never run by the default selection."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.backends.providers import DeviceError, plan_device, probe_gpu, require_providers, tensorrt_version
from edge_runtime.config import EngineConfig
from logit_metrics import mean_kl
from test_builder_parity import builds, our_logits  # noqa: F401 (builds is a fixture)

pytestmark = pytest.mark.gpu

# fp16 engine vs the fp32 CPU run of the same graph: random tiny models have flat distributions,
# so fp16 rounding moves the KL far less than this.
FP16_MAX_MEAN_KL = 1e-3


def _need(device: str) -> None:
    try:
        require_providers(device)
        gpu = probe_gpu()
        trt = tensorrt_version() if device == "tensorrt" else "-"
    except DeviceError as exc:
        pytest.skip(str(exc))
    print(f"\n{gpu.name} sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}, TensorRT {trt}")


# Requested before builds, so that a machine without them skips before building anything.
@pytest.fixture(scope="module")
def tensorrt() -> None:
    _need("tensorrt")


@pytest.fixture(scope="module")
def cuda() -> None:
    _need("cuda")


def _config(device: str) -> EngineConfig:
    return EngineConfig(device=device, max_batch=2, prefill_chunk=16, max_context=256, trt_workspace_mb=256)


def _logits_on(device: str, model_dir: Path, ids: np.ndarray) -> np.ndarray:
    config = _config(device)
    backend = OnnxRuntimeBackend(model_dir, max_batch=config.max_batch, max_context=config.max_context,
                                 device=plan_device(config, model_dir))
    return our_logits(backend, ids)


@pytest.mark.parametrize("arch", ["llama", "glm"])
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_tensorrt_matches_the_cpu_run(arch, quant, tensorrt, builds):
    ids = np.random.default_rng(4).integers(0, 320, 20)
    cpu = _logits_on("cpu", builds[arch, quant, "tensorrt"], ids)
    gpu = _logits_on("tensorrt", builds[arch, quant, "tensorrt"], ids)
    kl = mean_kl(cpu, gpu)
    print(f"{arch} {quant}: TensorRT vs CPU mean KL {kl:.2e}, max |diff| {np.abs(cpu - gpu).max():.3e}")
    assert kl < FP16_MAX_MEAN_KL
    assert (cpu.argmax(-1) == gpu.argmax(-1)).mean() >= 0.9


def test_engine_is_built_once_and_reused_from_the_cache(tensorrt, builds):
    model_dir = builds["glm", "int8", "tensorrt"]
    config = dataclasses.replace(_config("tensorrt"), max_batch=1)  # a profile no other test builds
    plan = plan_device(config, model_dir)
    cache = Path(plan.providers[0][1]["trt_engine_cache_path"])
    assert not any(cache.iterdir()), "the test session's private cache should start empty"

    def start() -> float:
        began = time.monotonic()
        OnnxRuntimeBackend(model_dir, max_batch=config.max_batch, max_context=config.max_context, device=plan)
        return time.monotonic() - began

    first = start()
    engines = {p: p.stat().st_mtime_ns for p in cache.rglob("*.engine")}
    assert engines, f"no engine written to {cache}"
    second = start()
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.engine")} == engines  # read, not rebuilt
    size = sum(p.stat().st_size for p in engines)
    print(f"engine build (first start) {first:.1f} s, cached start {second:.1f} s, engine {size / 2**20:.1f} MiB, "
          f"weights on disk {(model_dir / 'model.onnx.data').stat().st_size / 2**20:.1f} MiB")


def test_cuda_device_matches_the_cpu_run(cuda, builds):
    ids = np.random.default_rng(5).integers(0, 320, 20)
    cpu = _logits_on("cpu", builds["glm", "fp32", "tensorrt"], ids)
    gpu = _logits_on("cuda", builds["glm", "fp32", "tensorrt"], ids)
    kl = mean_kl(cpu, gpu)
    print(f"CUDA vs CPU mean KL {kl:.2e}")
    assert kl < FP16_MAX_MEAN_KL  # TF32 matmuls on Ampere and later
