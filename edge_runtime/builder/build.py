"""`edge-runtime build`: checkpoint -> OUTDIR with model.onnx(+.data), tokenizer files and
manifest.json. Idempotent: an OUTDIR whose manifest names the same source checksum and build
options is reused as it is."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import CheckpointError
from ..manifest import MANIFEST, read_manifest
from ..sd_notify import notify
from .checkpoint import Checkpoint, checksum, files_sha256, load_checkpoint
from .onnx_graph import KV_DTYPES, build_graph
from .progress import Progress, terminal
from .quantize import INT8_FORMS
from .tokenizer_export import export_tokenizer
from .trt_graph import build_trt_graph

log = logging.getLogger("edge_runtime.build")

BUILDER_VERSION = 2  # 2: INT4 block sums come out of the layer's own MatMulNBits
DEFAULT_INT8_FORM = "nbits"  # as fast as "dq" and far closer to fp32: bench/int8_forms.py
DEFAULT_MAX_CONTEXT = 8192
# Graph flavour -> (graph writer, its weight forms beside fp32, the default INT8 one). "ort": ONNX
# Runtime's fused contrib operators; "tensorrt": standard operators with Q/DQ INT8 (trt_graph.py).
FLAVOURS = {
    "ort": (build_graph, INT8_FORMS, DEFAULT_INT8_FORM),
    "tensorrt": (build_trt_graph, ("qdq",), "qdq"),
}
DEFAULT_INT4_HEAD_BITS = 8


@dataclass(frozen=True)
class BuildOptions:
    quant: str = "int8"  # "int8" | "int4" | "fp32"
    int8_form: str | None = None  # None: the flavour's default
    int4_head_bits: int = DEFAULT_INT4_HEAD_BITS  # the lm_head's bits in an INT4 build: 8 | 4
    arch: str | None = None
    max_context: int | None = None  # None: the checkpoint's, capped at DEFAULT_MAX_CONTEXT
    flavour: str = "ort"
    # The KV cache's element type: "fp32" | "fp16". fp16 halves the cache, but ONNX Runtime's
    # CPU attention converts it back every step: slower decode (docs/engine-performance.md).
    kv_dtype: str = "fp32"

    def kv_suffix(self) -> str:
        """What a cached build's directory name adds for a non-default KV type, so builds of
        each type live side by side and switching between them never rebuilds."""
        return "" if self.kv_dtype == "fp32" else f"-kv{self.kv_dtype}"

    def graph_quant(self) -> str:
        if self.flavour not in FLAVOURS:
            raise CheckpointError(f"unknown graph flavour {self.flavour!r} (known: {', '.join(FLAVOURS)})")
        if self.kv_dtype not in KV_DTYPES:
            raise CheckpointError(f"unknown KV cache type {self.kv_dtype} (known: {', '.join(KV_DTYPES)})")
        if self.flavour == "tensorrt" and self.kv_dtype != "fp32":
            raise CheckpointError("the tensorrt flavour keeps its KV cache in fp32 (TensorRT picks its own precision)")
        if self.quant == "fp32":
            return "fp32"
        if self.quant == "int4":
            if self.flavour != "ort" or self.int4_head_bits not in (4, 8):
                raise CheckpointError(f"int4 is a form of the ort flavour with an 8- or 4-bit head, not {self.flavour}/"
                                      f"{self.int4_head_bits}")
            return "int4" if self.int4_head_bits == 8 else "int4-head4"
        _, forms, default = FLAVOURS[self.flavour]
        form = self.int8_form or default
        if self.quant != "int8" or form not in forms:
            raise CheckpointError(f"unknown quantization {self.quant}/{form} for the {self.flavour} flavour (INT8 forms: {', '.join(forms)})")
        return form


def build(source: Path, out_dir: Path, options: BuildOptions = BuildOptions(), quiet: bool = False,
          progress: Progress = terminal) -> Path:
    """`progress`: how the slow steps show how far they are (builder/progress.py); none if quiet."""
    source, out_dir = Path(source), Path(out_dir)
    graph_quant = options.graph_quant()
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    digest = checksum(source, None if quiet else progress(f"hashing {source.name}"))
    key = {"source_sha256": digest, "quant": graph_quant, "arch": options.arch,
           "max_context": options.max_context, "flavour": options.flavour, "kv_dtype": options.kv_dtype,
           "builder_version": BUILDER_VERSION}
    existing = read_manifest(out_dir)
    if existing and existing.get("build_key") == key and (out_dir / existing["model_file"]).exists():
        return out_dir

    log.info("building the model (first use, or its source or options changed)",
             extra={"source": str(source), "out_dir": str(out_dir), "quant": graph_quant})
    notify("STATUS=building the model (first use): reading the checkpoint")  # (a no-op outside systemd)
    ckpt = load_checkpoint(source, options.arch)
    spec = ckpt.spec
    max_context = min(options.max_context or min(spec.max_context, DEFAULT_MAX_CONTEXT), spec.max_context)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        graph = write_model(ckpt, staging, options, max_context, None if quiet else progress("building layers"))
        tok = export_tokenizer(source, staging)
        manifest = {
            "format": "edge-runtime-model",
            "build_key": key,
            "source": str(source.resolve()),
            "source_sha256": digest,
            **graph,
            "tokenizer": tok.to_dict(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def write_model(ckpt: Checkpoint, out_dir: Path, options: BuildOptions, max_context: int,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the graph of `ckpt` (model.onnx + model.onnx.data) into out_dir; returns the
    manifest entries that describe it."""
    quant = options.graph_quant()
    model = FLAVOURS[options.flavour][0](ckpt, quant, max_context, progress, options.kv_dtype)
    onnx.save_model(model, out_dir / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return {
        "model_file": "model.onnx",
        "quantization": quant,
        "flavour": options.flavour,
        # Names the graph in TensorRT engine-cache paths (backends/providers.py).
        "graph_sha256": files_sha256([out_dir / "model.onnx", out_dir / "model.onnx.data"]),
        "max_context": max_context,
        "kv_dtype": options.kv_dtype,
        "spec": ckpt.spec.to_dict(),
    }


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished build into place so a crash never leaves a half-written model."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
