"""GPU decode benchmark of the tensorrt graph flavour: batch-1 decode tokens/s of a
GLM-Edge-1.5B-shaped model (random weights: speed does not depend on their values) on the
TensorRT device (or CUDA), side by side with the bound the GPU's memory bandwidth sets. A decode
step has to read every weight but the embedding table, and the KV cache so far, so

    bound tokens/s = peak bandwidth / bytes moved per token.

The engine-start time (TensorRT engine build on a first run, cache load afterwards) and the
engine's size on disk (what TensorRT kept of the INT8 weights) are reported too. While the KV
cache is bound in host memory, every step also copies it across the bus; that traffic is not in
the bound.

    python bench/gpu_bench.py [--device tensorrt|cuda] [--quant int8|fp32] [--layers 28]
        [--prompt-tokens 128] [--gen-tokens 128] [--max-context 1024] [--bandwidth-gbs N]
        [--out bench/results/NAME.json]

Without a GPU, onnxruntime-gpu or TensorRT it says why and exits 0 without results.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import benchlib
from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.backends.providers import DeviceError, plan_device, probe_gpu, require_providers, tensorrt_version
from edge_runtime.builder.build import BuildOptions, write_model
from edge_runtime.builder.checkpoint import Checkpoint
from edge_runtime.builder.spec import ModelSpec
from edge_runtime.config import EngineConfig
from edge_runtime.manifest import MANIFEST, read_manifest

# GLM-Edge-1.5B's shape as its Hugging Face config.json gives it (THUDM/glm-edge-1.5b-chat).
GLM_EDGE_1_5B = ModelSpec(
    arch="glm", hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=4, head_dim=128, intermediate_size=6144,
    vocab_size=59264, rms_norm_eps=1e-5, rope_theta=10000.0, rotary_dim=64, rope_interleaved=True, max_context=8192,
    qkv_bias=True, tie_word_embeddings=False,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("tensorrt", "cuda"), default="tensorrt")
    p.add_argument("--quant", choices=("int8", "fp32"), default="int8")
    p.add_argument("--layers", type=int, default=GLM_EDGE_1_5B.num_layers, help="fewer for a quick run on a small board")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--bandwidth-gbs", type=float, help="peak memory bandwidth (default: from the CUDA driver)")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


def _shape(name: str, spec: ModelSpec) -> tuple[int, ...]:
    """The canonical checkpoint tensor `name`'s shape (builder/checkpoint.py's naming)."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    kind = name.split(".")[-1]
    return {
        "embed": (spec.vocab_size, h), "lm_head": (spec.vocab_size, h), "norm": (h,), "attn_norm": (h,), "mlp_norm": (h,),
        "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,),
        "gate": (spec.intermediate_size, h), "up": (spec.intermediate_size, h), "down": (h, spec.intermediate_size),
    }[kind]


def random_checkpoint(spec: ModelSpec) -> Checkpoint:
    def get(name: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same weights every run
        shape = _shape(name, spec)
        if len(shape) == 1:  # norms and biases
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32))

    return Checkpoint(Path("random"), spec, get)


def built_model(spec: ModelSpec, quant: str, max_context: int) -> Path:
    """The random model, built once into bench/.cache."""
    out = benchlib.CACHE_DIR / "models" / f"glm-edge-1.5b-shape-L{spec.num_layers}-{quant}-trt-{max_context}"
    if read_manifest(out) is None:
        out.mkdir(parents=True, exist_ok=True)
        graph = write_model(random_checkpoint(spec), out, BuildOptions(quant=quant, flavour="tensorrt"), max_context)
        (out / MANIFEST).write_text(json.dumps({"format": "edge-runtime-model", **graph}, indent=2))
    return out


def weight_bytes_per_token(model_dir: Path, spec: ModelSpec) -> int:
    """Initialiser bytes a decode step reads: all but the embedding table, of which one row (a
    tied table is read whole, as the lm_head)."""
    graph = onnx.load(model_dir / "model.onnx", load_external_data=False).graph
    total = 0
    for t in graph.initializer:
        size = next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))
        if t.name.startswith("embed.") and not spec.tie_word_embeddings:
            size //= spec.vocab_size  # one row of the table (or its one scale)
        total += size
    return total


def main() -> int:
    args = parse_args()
    try:
        require_providers(args.device)
        gpu = probe_gpu()
        trt = tensorrt_version() if args.device == "tensorrt" else None
    except DeviceError as exc:
        print(f"gpu_bench: not run: {exc}")
        return 0
    spec = replace(GLM_EDGE_1_5B, num_layers=args.layers)
    model_dir = built_model(spec, args.quant, args.max_context)
    config = EngineConfig(device=args.device, max_batch=1, prefill_chunk=args.prompt_tokens, max_context=args.max_context)
    plan = plan_device(config, model_dir)
    cache = Path(plan.providers[0][1]["trt_engine_cache_path"]) if args.device == "tensorrt" else None
    cached_before = bool(cache and any(cache.glob("*.engine")))

    began = time.monotonic()
    backend = OnnxRuntimeBackend(model_dir, max_batch=1, max_context=args.max_context, device=plan)
    start_s = time.monotonic() - began
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, spec.vocab_size, args.prompt_tokens)

    def run(tokens: int) -> tuple[float, float]:
        slot = backend.allocate()
        try:
            t0 = time.monotonic()
            token = int(backend.prefill(slot, prompt).argmax())
            t1 = time.monotonic()
            for _ in range(tokens):
                token = int(backend.decode([slot], [token])[0].argmax())
            return t1 - t0, time.monotonic() - t1
        finally:
            backend.free(slot)

    run(8)  # warm-up: first-run allocations and kernel selection
    prefill_s, decode_s = run(args.gen_tokens)
    tok_s = args.gen_tokens / decode_s

    mean_ctx = args.prompt_tokens + args.gen_tokens / 2
    weights = weight_bytes_per_token(model_dir, spec)
    kv = int(mean_ctx * backend.kv_bytes_per_token())
    moved = weights + kv + 4 * spec.vocab_size  # + the logits written
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else gpu.peak_bandwidth
    bound = bandwidth / moved
    engine_bytes = sum(p.stat().st_size for p in cache.glob("*.engine")) if cache else None

    data = {
        "command": benchlib.command_line(),
        "machine": benchlib.machine_info(),
        "gpu": {"name": gpu.name, "compute_capability": list(gpu.compute_capability), "total_memory": gpu.total_memory,
                "peak_bandwidth_gbs": round(bandwidth / 1e9, 1), "bandwidth_from": "--bandwidth-gbs" if args.bandwidth_gbs else "CUDA driver"},
        "versions": {"onnxruntime": ort.__version__, "tensorrt": trt},
        "model": {"shape": "GLM-Edge-1.5B", "layers": spec.num_layers, "quant": args.quant, "flavour": "tensorrt",
                  "weights_on_disk": (model_dir / "model.onnx.data").stat().st_size},
        "device": args.device,
        "session_start_s": round(start_s, 2), "engine_cache_hit": cached_before, "engine_bytes": engine_bytes,
        "prompt_tokens": args.prompt_tokens, "prefill_s": round(prefill_s, 4),
        "gen_tokens": args.gen_tokens, "decode_tok_s": round(tok_s, 2),
        "bytes_per_token": {"weights": weights, "kv_at_mean_context": kv, "total": moved},
        "bandwidth_bound_tok_s": round(bound, 2), "share_of_bound": round(tok_s / bound, 3),
    }
    rows = [[args.device, args.quant, spec.num_layers, f"{tok_s:.1f}", f"{bound:.1f}", f"{tok_s / bound:.0%}",
             f"{moved / 2**20:.0f}", f"{start_s:.1f}{' (cached)' if cached_before else ''}",
             "-" if engine_bytes is None else f"{engine_bytes / 2**20:.0f}"]]
    markdown = (
        f"# GPU decode, batch 1: {gpu.name} (sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}), "
        f"onnxruntime {ort.__version__}, TensorRT {trt or '-'}\n\n`{data['command']}`\n\n"
        + benchlib.markdown_table(["device", "quant", "layers", "decode tok/s", "bandwidth bound tok/s", "share",
                                   "MiB moved/token", "session start s", "engine MiB"], rows)
        + f"\n\nBound: {bandwidth / 1e9:.1f} GB/s ({data['gpu']['bandwidth_from']}) over the bytes one decode step must read "
        f"(weights but the embedding table, KV cache at {mean_ctx:.0f} tokens, logits).\n"
    )
    benchlib.report(args.out, data, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
