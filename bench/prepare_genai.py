"""Build onnxruntime-genai CPU models (INT8 and INT4) of a GGUF checkpoint, for
bench/llm_bench.py. Runs in the genai virtualenv (see bench/README.md), not the project's.

genai's model builder takes a GGUF only in float16/float32, so a quantized GGUF goes through
a Hugging Face directory first: transformers dequantizes it (offline) and saves float32
safetensors, and the builder quantizes that again, as our builder does from the GGUF.
Weights are block-wise (32) symmetric MatMulNBits with accuracy_level 4 (int8 activations),
the same form as our default INT8 build.

Idempotent: everything is kept under OUT/<gguf stem>/ with the GGUF's sha256, and a step
whose output exists for the same GGUF is skipped. Prints one JSON line: {precision: dir}."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

PRECISIONS = ("int8", "int4")
STAMP = "source.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_current(out: Path, digest: str) -> bool:
    stamp = out / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("gguf_sha256") == digest


def stamp(out: Path, gguf: Path, digest: str) -> None:
    (out / STAMP).write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": digest}) + "\n")


def export_hf(gguf: Path, out: Path) -> None:
    """A float32 Hugging Face directory of the GGUF, through transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # a model loaded "quantized with gguf" refuses to save
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def run_builder(hf_dir: Path, out: Path, precision: str, scratch: Path) -> None:
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
        "-p", precision, "-e", "cpu", "-c", str(scratch), "--extra_options", "accuracy_level=4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"genai builder failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def prepare(gguf: Path, root: Path, digest: str, step: str, make: Callable[[Path], None]) -> Path:
    """root/step made by make(staging dir) unless current; built aside, then moved in place."""
    out = root / step
    if is_current(out, digest):
        return out
    staging = root / f".{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    make(staging)
    stamp(staging, gguf, digest)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    args = p.parse_args()
    root = args.out / args.gguf.stem
    root.mkdir(parents=True, exist_ok=True)
    digest = sha256(args.gguf)
    hf_dir = prepare(args.gguf, root, digest, "hf", partial(export_hf, args.gguf))
    scratch = root / ".builder-cache"
    dirs = {
        q: str(prepare(args.gguf, root, digest, q, partial(run_builder, hf_dir, precision=q, scratch=scratch)))
        for q in args.precisions
    }
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(dirs))


if __name__ == "__main__":
    main()
