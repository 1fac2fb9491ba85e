"""Which grammar engine computes token masks fastest on the default model's vocabulary (not a
test): xgrammar, llguidance and outlines-core, each given the same JSON schema and the same
valid output, timed per token (mask + advance), plus its one-off costs (tokenizer info,
grammar compile), on two workloads: a small object of mostly forced keys, and 40 objects of
free strings and numbers. Writes bench/results/grammar_libs-smollm2-135m.{json,md}.

    pip install xgrammar outlines-core   # measured here only; the engine depends on llguidance alone
    python bench/grammar_libs.py [--model DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import benchlib
import numpy as np
from agent_bench import SCHEMA as READINGS  # the schema agent_bench.py times decode with

SCHEMA = {
    "type": "object",
    "properties": {
        "sensor": {"type": "string", "enum": ["temperature", "humidity", "pressure"]},
        "location": {"type": "string"},
        "value": {"type": "number"},
        "unit": {"type": "string"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sensor", "location", "value", "unit", "ok", "tags"],
    "additionalProperties": False,
}
OUTPUT = {"sensor": "temperature", "location": "greenhouse north wall", "value": 21.75, "unit": "celsius",
          "ok": True, "tags": ["hourly", "calibrated", "zone-3"]}
READINGS_OUTPUT = {"readings": [{"room": f"room {i}", "celsius": round(18 + i * 0.37, 2), "ok": i % 3 > 0} for i in range(40)]}
WORKLOADS = {"6 properties": (SCHEMA, OUTPUT), "40 objects": (READINGS, READINGS_OUTPUT)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_llguidance(tok_json: str, eos: list[int], vocab: int, schema: dict, ids: list[int]) -> dict[str, Any]:
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    lltok, t_info = _timed(lambda: llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher, t_compile = _timed(lambda: llguidance.LLMatcher(lltok, grammar))
    assert not matcher.is_error(), matcher.get_error()
    mask = allocate_token_bitmask(1, vocab)

    def run() -> list[float]:
        m = llguidance.LLMatcher(lltok, grammar)
        times = []
        for t in ids:
            s = time.perf_counter()
            fill_next_token_bitmask(m, mask)
            assert (mask[0, t >> 5] >> (t & 31)) & 1, t
            ok = m.consume_token(t)
            times.append(time.perf_counter() - s)
            assert ok, m.get_error()
        assert m.is_accepting()
        return times

    return {"tokenizer_info_s": t_info, "compile_s": t_compile, "run": run}


def bench_xgrammar(model_dir: Path, vocab: int, schema: dict, ids: list[int]) -> dict[str, Any]:
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    info, t_info = _timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, t_compile = _timed(lambda: compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":")))
    mask = xgr.allocate_token_bitmask(1, vocab)

    def run() -> list[float]:
        m = xgr.GrammarMatcher(compiled)
        times = []
        for t in ids:
            s = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            ok = m.accept_token(t)
            times.append(time.perf_counter() - s)
            assert ok, t
        return times

    return {"tokenizer_info_s": t_info, "compile_s": t_compile, "run": run}


def bench_outlines(tok_json: str, eos: int, vocab: int, schema: dict, ids: list[int]) -> dict[str, Any]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary() -> Any:
        from edge_runtime.builder.tokenizer_export import _byte_alphabet

        unbyte = {c: b for b, c in _byte_alphabet().items()}
        tokens: dict[bytes, list[int]] = {}
        for text, i in json.loads(tok_json)["model"]["vocab"].items():
            if i != eos and all(c in unbyte for c in text):
                tokens.setdefault(bytes(unbyte[c] for c in text), []).append(i)
        return outlines_core.Vocabulary(eos, tokens)

    voc, t_info = _timed(vocabulary)
    regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
    index, t_compile = _timed(lambda: outlines_core.Index(regex, voc))
    mask = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def run() -> list[float]:
        g = outlines_core.Guide(index)
        times = []
        for t in ids:
            s = time.perf_counter()
            g.write_mask_into(mask.ctypes.data, mask.size, 4)
            g.advance(t, return_tokens=False)
            times.append(time.perf_counter() - s)
        return times

    return {"tokenizer_info_s": t_info, "compile_s": t_compile, "run": run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="built model directory (default: the default model)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    from edge_runtime.models import resolve_model
    from edge_runtime.tokenizer import Tokenizer

    model_dir = args.model or resolve_model(None, quiet=True)
    tok = Tokenizer.from_dir(model_dir)
    tok_json = (model_dir / "tokenizer.json").read_text()
    vocab = tok.vocab_size
    rows = []
    for workload, (schema, output) in WORKLOADS.items():
        ids = tok.encode(json.dumps(output, separators=(",", ":")), add_special_tokens=False)
        loose = tok.encode(json.dumps(output), add_special_tokens=False)  # outlines' regex wants its own separators
        libs = {
            "llguidance": lambda: bench_llguidance(tok_json, tok.eos_token_ids, vocab, schema, ids),
            "xgrammar": lambda: bench_xgrammar(model_dir, vocab, schema, ids),
            "outlines-core": lambda: bench_outlines(tok_json, tok.eos_token_ids[0], vocab, schema, loose),
        }
        for name, make in libs.items():
            setup = make()
            per_token = []
            for _ in range(args.repeat):
                per_token += setup["run"]()
            rows.append({
                "workload": f"{workload} ({len(ids)} tokens)", "library": name, "version": _version(name),
                "tokenizer_info_s": round(setup["tokenizer_info_s"], 4), "compile_s": round(setup["compile_s"], 4),
                "mask_us_median": round(statistics.median(per_token) * 1e6, 1),
                "mask_us_p90": round(float(np.percentile(per_token, 90)) * 1e6, 1),
                "mask_us_mean": round(statistics.fmean(per_token) * 1e6, 1),
            })
            print(rows[-1], flush=True)
    headers = ["workload", "library", "version", "tokenizer info (s)", "compile (s)", "mask+advance median (µs)", "p90 (µs)",
               "mean (µs)"]
    table = benchlib.markdown_table(headers, [list(r.values()) for r in rows])
    info = benchlib.machine_info()
    md = (f"# Grammar engines: token mask cost on the default model's vocabulary ({vocab} tokens)\n\n"
          f"Command: `{benchlib.command_line()}`\n\nMachine: {info['cpu_model']}, {info['usable_cpus']} usable CPUs, "
          f"load {info['load_avg_1m_at_start']} at start. One thread per library; the tokens of a valid answer fed one "
          f"at a time (mask, then advance), {args.repeat} runs per workload.\n\n{table}\n")
    out = benchlib.BENCH_DIR / "results" / "grammar_libs-smollm2-135m.json"
    benchlib.write_results(out, {"machine": info, "command": benchlib.command_line(), "vocab_size": vocab,
                                 "repeat": args.repeat, "workloads": {k: v[0] for k, v in WORKLOADS.items()}, "rows": rows}, md)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
