"""Which ONNX Runtime execution providers a session gets, from the configured `[engine] device`
("cpu", "cuda" or "tensorrt"): chosen, never guessed, and refused at start with the reason when
the providers, the GPU or the model cannot serve the configured shapes.

For "tensorrt" the TensorRT provider's options come from the config and the model: fp16 on
(INT8 from the graph's Q/DQ nodes, no calibration table), one optimisation profile spanning
max_batch, prefill_chunk and max_context, a workspace limit, and engine and timing caches in a
directory keyed by GPU name, compute capability, TensorRT and ONNX Runtime versions and the
graph's hash, so a cached engine is only ever reused where it was built. The CUDA provider takes
whatever TensorRT does not; the CPU provider is last, as ONNX Runtime requires.

Option names are those of onnxruntime-gpu >= 1.17's TensorRT provider (the timing-cache path
and layer-norm fallback options are the newest used).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from ..builder.spec import ModelSpec
from ..config import EngineConfig
from ..errors import EdgeRuntimeError
from ..manifest import read_manifest
from ..models import cache_dir

_PROVIDER = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_INSTALL = "install onnxruntime-gpu (on Jetson: NVIDIA's build for JetPack, see docs/jetson.md)"
# libcuda's CUdevice_attribute numbers (cuda.h)
_CC_MAJOR, _CC_MINOR, _MEM_CLOCK_KHZ, _BUS_WIDTH_BITS = 75, 76, 36, 37


class DeviceError(EdgeRuntimeError):
    """The configured device cannot run this model with this configuration (the message says why)."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory: int  # bytes (on Jetson: the memory the GPU shares with the CPU)
    peak_bandwidth: float  # bytes/s, from the memory clock and bus width


@dataclass(frozen=True)
class Shapes:
    """The largest shapes the engine will run: the optimisation profile must hold them."""

    max_batch: int
    prefill_chunk: int
    max_context: int


@dataclass(frozen=True)
class DevicePlan:
    device: str
    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: [("CPUExecutionProvider", {})])

    def open_session(self, model_path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        """The session, refused if ONNX Runtime did not start the asked provider (it falls back
        to the next one with only a logged warning when, say, libnvinfer fails to load)."""
        session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        wanted, active = self.providers[0][0], session.get_providers()
        if active[0] != wanted:
            raise DeviceError(f"device {self.device!r}: onnxruntime did not start {wanted} (running on {active}); "
                              "its log above says why")
        return session


CPU = DevicePlan("cpu")


def plan_device(config: EngineConfig, model_dir: Path) -> DevicePlan:
    """The providers for the configured device, after checking that they exist and that the GPU
    and the model can hold the configured shapes."""
    device = config.device
    if device == "cpu":
        return CPU
    require_providers(device)
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    if device == "cuda":
        return DevicePlan(device, [cuda, ("CPUExecutionProvider", {})])
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise DeviceError(f"{model_dir}: not a built model (no readable manifest.json)")
    shapes = Shapes(config.max_batch, config.prefill_chunk, config.max_context or manifest["max_context"])
    workspace = config.trt_workspace_mb << 20
    gpu = probe_gpu()
    check_profile(manifest, model_dir, shapes, workspace, gpu)
    trt = tensorrt_options(manifest, shapes, workspace, gpu, tensorrt_version(), ort.__version__, cache_dir())
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        Path(trt[key]).mkdir(parents=True, exist_ok=True)
    return DevicePlan(device, [("TensorrtExecutionProvider", trt), cuda, ("CPUExecutionProvider", {})])


def require_providers(device: str) -> None:
    """Refuses a GPU device whose providers this onnxruntime lacks (the CPU-only package)."""
    available = ort.get_available_providers()
    for needed in (device, "cuda"):
        if _PROVIDER[needed] not in available:
            raise DeviceError(f"device {device!r} needs {_PROVIDER[needed]}, which this onnxruntime "
                              f"{ort.__version__} does not have (it has {', '.join(available)}): {_INSTALL}")


# ---------------------------------------------------------------------------------------------- TensorRT


def profile_shapes(spec: ModelSpec, shapes: Shapes) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for every dynamic input. The optimum is batched decode
    (one token per sequence), the hot path; the maximum a full prefill chunk for every slot."""
    b, chunk, ctx = shapes.max_batch, shapes.prefill_chunk, shapes.max_context
    dims = {  # input -> (min, opt, max)
        "input_ids": ((1, 1), (b, 1), (b, chunk)),
        "seqlens_k": ((1,), (b,), (b,)),
        "logits_index": ((1,), (1,), (chunk,)),  # prefill_logits asks for every position
        # The attended length: it reaches the graph's shapes (Slice ends), which makes it a
        # TensorRT shape tensor, whose profile entry holds values rather than dimensions.
        "total_sequence_length": ((1,), (ctx,), (ctx,)),
    }
    kv = ((1, spec.num_kv_heads, 1, spec.head_dim), (b, spec.num_kv_heads, ctx, spec.head_dim), (b, spec.num_kv_heads, ctx, spec.head_dim))
    for i in range(spec.num_layers):
        dims[f"past_key_values.{i}.key"] = dims[f"past_key_values.{i}.value"] = kv
    return {
        f"trt_profile_{which}_shapes": ",".join(f"{name}:{'x'.join(map(str, d[j]))}" for name, d in dims.items())
        for j, which in enumerate(("min", "opt", "max"))
    }


def check_profile(manifest: dict[str, Any], model_dir: Path, shapes: Shapes, workspace: int, gpu: GpuInfo) -> None:
    """Refuses a configuration the TensorRT engine cannot be built for, naming what does not fit."""
    if manifest.get("flavour") != "tensorrt":
        raise DeviceError(f"{model_dir}: built for the {manifest.get('flavour', 'ort')} flavour, whose contrib operators "
                          "TensorRT cannot take; build it with `edge-runtime build --flavour tensorrt`")
    if shapes.max_context > manifest["max_context"]:
        raise DeviceError(f"max_context {shapes.max_context} is past the {manifest['max_context']} tokens the model was "
                          "built for: lower it or rebuild with --max-context")
    if shapes.prefill_chunk > shapes.max_context:
        raise DeviceError(f"prefill_chunk {shapes.prefill_chunk} is longer than max_context {shapes.max_context}")
    spec = ModelSpec.from_dict(manifest["spec"])
    kv_bytes = 2 * spec.num_layers * shapes.max_batch * spec.num_kv_heads * shapes.max_context * spec.head_dim * _kv_itemsize(model_dir)
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))
    # Attention scores of a full prefill chunk, in fp16: TensorRT allocates them for the profile's maximum.
    scores_bytes = 2 * shapes.max_batch * spec.num_heads * shapes.prefill_chunk * shapes.max_context
    needed = {"KV cache": kv_bytes, "weights": weight_bytes, "workspace": workspace, "attention scores": scores_bytes}
    if sum(needed.values()) > gpu.total_memory:
        parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in needed.items())
        raise DeviceError(f"the TensorRT profile for max_batch {shapes.max_batch}, prefill_chunk {shapes.prefill_chunk}, "
                          f"max_context {shapes.max_context} needs {sum(needed.values()) / 2**20:.0f} MiB ({parts}) but "
                          f"{gpu.name} has {gpu.total_memory / 2**20:.0f} MiB: lower one of them or trt_workspace_mb")


def _kv_itemsize(model_dir: Path) -> int:
    """Bytes per KV element, as the graph declares its cache inputs."""
    graph = onnx.load(model_dir / "model.onnx", load_external_data=False).graph
    kv = next(i for i in graph.input if i.name == "past_key_values.0.key")
    return onnx.helper.tensor_dtype_to_np_dtype(kv.type.tensor_type.elem_type).itemsize


def tensorrt_options(manifest: dict[str, Any], shapes: Shapes, workspace: int, gpu: GpuInfo,
                     trt_version: str, ort_version: str, cache_root: Path) -> dict[str, Any]:
    spec = ModelSpec.from_dict(manifest["spec"])
    engine = {
        "trt_fp16_enable": True,
        "trt_int8_enable": manifest["quantization"] == "qdq",  # scales from the graph's Q/DQ nodes
        "trt_layer_norm_fp32_fallback": True,  # RMS norms' Pow + ReduceMean in fp32 (no overflow)
        "trt_max_workspace_size": workspace,
        **profile_shapes(spec, shapes),
    }
    # Everything that shapes the engine names its directory, so a changed profile never reuses an old engine.
    engine_key = hashlib.sha256(repr(sorted(engine.items())).encode()).hexdigest()[:12]
    gpu_dir = Path(cache_root) / "tensorrt" / f"{_slug(gpu.name)}-sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}-trt{trt_version}-ort{ort_version}"
    return {
        "device_id": 0,
        **engine,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(gpu_dir / f"{manifest['graph_sha256'][:16]}-{engine_key}"),
        "trt_timing_cache_enable": True,  # layer timings carry over between graphs on one GPU
        "trt_timing_cache_path": str(gpu_dir),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


# ---------------------------------------------------------------------------------------------- probes


def probe_gpu(ordinal: int = 0) -> GpuInfo:
    """GPU facts from the CUDA driver (libcuda, present wherever the NVIDIA driver is, Jetson
    included, where NVML is not)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise DeviceError(f"no NVIDIA driver: {exc}") from None

    def call(what: str, rc: int) -> None:
        if rc != 0:
            raise DeviceError(f"CUDA driver: {what} failed (CUresult {rc})")

    call("cuInit", cuda.cuInit(0))
    dev = ctypes.c_int()
    call(f"cuDeviceGet({ordinal})", cuda.cuDeviceGet(ctypes.byref(dev), ordinal))
    name = ctypes.create_string_buffer(256)
    call("cuDeviceGetName", cuda.cuDeviceGetName(name, len(name), dev))
    attrs = {}
    for attr in (_CC_MAJOR, _CC_MINOR, _MEM_CLOCK_KHZ, _BUS_WIDTH_BITS):
        value = ctypes.c_int()
        call("cuDeviceGetAttribute", cuda.cuDeviceGetAttribute(ctypes.byref(value), attr, dev))
        attrs[attr] = value.value
    memory = ctypes.c_size_t()
    call("cuDeviceTotalMem", cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), dev))
    return GpuInfo(
        name=name.value.decode(), compute_capability=(attrs[_CC_MAJOR], attrs[_CC_MINOR]), total_memory=memory.value,
        peak_bandwidth=2 * attrs[_MEM_CLOCK_KHZ] * 1e3 * attrs[_BUS_WIDTH_BITS] / 8,  # double data rate
    )


def tensorrt_version() -> str:
    """The TensorRT library the provider will load (by the names it loads it by)."""
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            return version_string(ctypes.CDLL(name).getInferLibVersion())
        except OSError:
            continue
    raise DeviceError("device 'tensorrt': libnvinfer (TensorRT) is not on the library path; on Jetson it comes with JetPack")


def version_string(v: int) -> str:
    """NV_TENSORRT_VERSION as text: major*10000 + minor*100 + patch from 10.0 on, major*1000 + ... before."""
    major, rest = (v // 10000, v % 10000) if v >= 10000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"
