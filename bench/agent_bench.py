"""Benchmark of the agent features (not a test), in one run on the default model:

 (a) decode tokens/s with a JSON-schema constraint against unconstrained, at batch 1 and 8
     (the engine's scheduler in-process, greedy, 128 tokens per stream), plus the grammar's own
     cost per token (mask + masking the logits + advancing), timed apart;
 (b) the safety filter's cost per streamed token (the output guard over the default model's
     own streamed tokens, with a realistic policy).

    python bench/agent_bench.py [--threads 2] [--rounds 3] [--out bench/results/agent_bench-smollm2-135m.json]

Goals: constraint overhead at most 10% of decode time; filter under 50 µs per token.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions
from edge_runtime.grammar import GrammarSpec
from edge_runtime.prepare import RequestPreparer
from edge_runtime.protocol import Generation
from edge_runtime.sampling import Sampler, SamplingParams
from edge_runtime.scheduler import Request, Scheduler
from edge_runtime.tokenizer import Tokenizer
from edge_wire.messages import ChatMessage, GenerateOp
from proxy.safety import SafetyFilter
from proxy.safety.policy import from_table

GOAL_OVERHEAD = 0.10
GOAL_FILTER_US = 50.0
MAX_TOKENS = 128
SCHEMA = {  # long enough that every stream runs its 128 tokens: structure, short strings and numbers
    "type": "object",
    "properties": {"readings": {"type": "array", "minItems": 40, "maxItems": 40, "items": {
        "type": "object",
        "properties": {"room": {"type": "string", "maxLength": 12}, "celsius": {"type": "number"}, "ok": {"type": "boolean"}},
        "required": ["room", "celsius", "ok"], "additionalProperties": False,
    }}},
    "required": ["readings"], "additionalProperties": False,
}
QUESTIONS = [
    "List the temperature readings of every room in the house as JSON.",
    "Give me today's greenhouse sensor log as JSON.",
    "Report the cold-storage temperatures, one entry per room.",
    "What did the sensors in the east wing read this morning?",
    "Summarize the boiler room readings in JSON.",
    "Write the hourly readings of the server room.",
    "Tell me the temperatures of all the labs.",
    "Which rooms are too warm? Answer with readings.",
]
POLICY = {
    "categories": {
        "weapons": {"terms": ["pipe bomb", "nerve agent", "sarin", "ricin", *(f"blocked term {i}" for i in range(46))], "action": "block"},
        "secrets": {"patterns": [r"api[_ -]?key\s*[:=]", r"password\s*[:=]"], "action": "redact"},
    },
    "pii": {"email": "redact", "phone": "redact", "card": "block", "national_id": "redact"},
}


def _chat(request_id: str, question: str, params: SamplingParams, grammar: GrammarSpec | None) -> Generation:
    """One user turn with its grammar, as the engine holds a generate request."""
    messages = [{"role": "user", "content": question}]
    op = GenerateOp(id=request_id, params=params, messages=[ChatMessage(**m) for m in messages])
    return Generation(op, messages, None, grammar)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="built model directory (default: the default GGUF built to INT8 in bench/.cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each case, interleaved; the median is reported")
    p.add_argument("--out", type=Path, default=benchlib.BENCH_DIR / "results" / "agent_bench-smollm2-135m.json")
    return p.parse_args()


def run_batch(scheduler: Scheduler, preparer: RequestPreparer, batch: int, constrained: bool) -> dict[str, Any]:
    """`batch` greedy streams at once; aggregate decode tok/s over the window where all decode."""
    grammar = GrammarSpec("json_schema", schema=SCHEMA) if constrained else None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=not constrained)
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = [threading.Event() for _ in range(batch)]
    for i in range(batch):
        request = _chat(f"r{i}", QUESTIONS[i % len(QUESTIONS)], params, grammar)
        constraint, parser = preparer.constraint(request)

        def sink(chunk: Any, i: int = i) -> None:
            arrivals[i].append(time.perf_counter())
            tokens[i].append(chunk.token_id)
            if chunk.finish_reason:
                finished[i].set()

        scheduler.submit(Request(request.op.id, preparer.prompt_ids(request), params, constraint=constraint, tool_parser=parser),
                         sink)
    for event in finished:
        event.wait()
    start = max(a[0] for a in arrivals)  # every stream has its first token
    end = min(a[-1] for a in arrivals)  # no stream has finished
    in_window = sum(sum(start < t <= end for t in a) for a in arrivals)
    return {"tok_s": in_window / (end - start), "tokens": tokens, "lengths": [len(a) for a in arrivals]}


def grammar_cost_us(preparer: RequestPreparer, token_runs: list[list[int]], vocab: int, schema: dict[str, Any]) -> float:
    """Mean µs per token that a constrained greedy step adds: the mask, the pick restricted to it
    and advancing the matcher, less the same pick unconstrained (the constrained streams' tokens
    replayed on random logits)."""
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    constrained = plain = 0.0
    count = 0
    for run in token_runs:
        constraint, _ = preparer.constraint(_chat("g", "x", SamplingParams(max_tokens=MAX_TOKENS),
                                                  GrammarSpec("json_schema", schema=schema)))
        sampler = Sampler(SamplingParams(temperature=0.0), vocab)
        for token in run[:-1]:  # the last token of a stream is never advanced past
            t = time.perf_counter()
            sampler.sample(logits, constraint.allowed())
            constraint.accept(token)
            u = time.perf_counter()
            sampler.sample(logits)
            constrained, plain, count = constrained + u - t, plain + time.perf_counter() - u, count + 1
    return (constrained - plain) / count * 1e6


def _without_max_length() -> dict[str, Any]:
    """SCHEMA with no bound on string length: llguidance masks a length-bounded string per token
    without its token-trie shortcuts, so `maxLength` is the costly part of this schema."""
    items = SCHEMA["properties"]["readings"]["items"]
    room = {k: v for k, v in items["properties"]["room"].items() if k != "maxLength"}
    readings = {**SCHEMA["properties"]["readings"], "items": {**items, "properties": {**items["properties"], "room": room}}}
    return {**SCHEMA, "properties": {"readings": readings}}


def filter_cost_us(pieces: list[str], policy: dict[str, Any], repeats: int = 20) -> float:
    safety = SafetyFilter(from_table(policy, None))
    t = time.perf_counter()
    for _ in range(repeats):
        guard = safety.output_guard()
        for piece in pieces:
            guard.push(piece)
        guard.flush()
        assert guard.blocked is None
    return (time.perf_counter() - t) / (repeats * len(pieces)) * 1e6


def main() -> None:
    args = parse_args()
    machine = benchlib.machine_info()
    model_dir = (args.model or benchlib.build_edge(benchlib.default_gguf(), BuildOptions())).resolve()
    tokenizer = Tokenizer.from_dir(model_dir)
    backend = OnnxRuntimeBackend(model_dir, max_batch=8, max_context=1024, threads=args.threads)
    scheduler = Scheduler(backend, tokenizer)
    scheduler.start()
    preparer = RequestPreparer(tokenizer, backend.vocab_size)
    preparer.grammars.warm()
    cases = [(batch, constrained) for batch in (1, 8) for constrained in (False, True)]
    for batch, constrained in cases:  # warm-up: ONNX Runtime's first runs, grammar compile
        run_batch(scheduler, preparer, batch, constrained)
    rates: dict[tuple[int, bool], list[float]] = {case: [] for case in cases}
    outputs: dict[tuple[int, bool], list[list[int]]] = {}
    for _ in range(args.rounds):
        for case in cases:
            result = run_batch(scheduler, preparer, *case)
            assert all(n == MAX_TOKENS for n in result["lengths"]), result["lengths"]
            rates[case].append(result["tok_s"])
            outputs[case] = result["tokens"]
    scheduler.shutdown(5)
    rows = []
    for batch in (1, 8):
        plain, json_rate = statistics.median(rates[(batch, False)]), statistics.median(rates[(batch, True)])
        rows.append({"batch": batch, "unconstrained_tok_s": round(plain, 1), "json_schema_tok_s": round(json_rate, 1),
                     "overhead": round(1 - json_rate / plain, 4), "rounds_unconstrained": [round(r, 1) for r in rates[(batch, False)]],
                     "rounds_json_schema": [round(r, 1) for r in rates[(batch, True)]]})
    grammar_us = {"as run": round(grammar_cost_us(preparer, outputs[(8, True)], backend.vocab_size, SCHEMA), 1),
                  "without maxLength": round(grammar_cost_us(preparer, outputs[(8, True)], backend.vocab_size, _without_max_length()), 1)}
    pieces = [tokenizer.decode([t]) for run in outputs[(8, False)] for t in run]
    filters = {
        "terms + patterns + PII": round(filter_cost_us(pieces, POLICY), 2),
        "PII only": round(filter_cost_us(pieces, {"pii": POLICY["pii"]}), 2),
    }
    report = {
        "machine": machine, "command": benchlib.command_line(), "model": str(model_dir), "threads": args.threads,
        "max_tokens": MAX_TOKENS, "schema": SCHEMA, "decode": rows, "grammar_us_per_token": grammar_us,
        "filter_us_per_token": filters, "filter_tokens": len(pieces),
        "goals": {"constraint_overhead_max": GOAL_OVERHEAD, "filter_us_max": GOAL_FILTER_US},
    }
    benchlib.write_results(args.out, report, markdown(report))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    decode = benchlib.markdown_table(
        ["batch", "unconstrained tok/s", "JSON-schema tok/s", "overhead", "rounds (unconstrained / JSON)"],
        [[row["batch"], row["unconstrained_tok_s"], row["json_schema_tok_s"], f"{row['overhead']:.1%}",
          f"{row['rounds_unconstrained']} / {row['rounds_json_schema']}"] for row in r["decode"]],
    )
    filters = benchlib.markdown_table(["policy", "µs per streamed token"], list(r["filter_us_per_token"].items()))
    worst = max(row["overhead"] for row in r["decode"])
    filter_worst = max(r["filter_us_per_token"].values())
    return f"""# Agent features benchmark: constrained decoding and the safety filter

Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['mem_total_gib']} GiB (load {m['load_avg_1m_at_start']}, \
{m['cpu_busy_at_start']:.0%} busy with other work at start).

Command: `{r['command']}`

Model: `{r['model']}`, {r['threads']} threads, the engine's scheduler in-process (8 KV slots of 1024 tokens).

## (a) Decode with a JSON-schema constraint

Greedy streams of {r['max_tokens']} tokens, distinct chat prompts, all sent at once; unconstrained streams ignore EOS,
constrained ones follow a schema of 40 objects (short strings, numbers, booleans) so that they too run the full
{r['max_tokens']} tokens. tok/s is the aggregate decode rate over the window where every stream was decoding; median
of the rounds, cases interleaved. The grammar engine is llguidance (bench/results/grammar_libs-smollm2-135m.md).

{decode}

What the constraint adds per token, timed apart (the mask, the greedy pick restricted to it and advancing the
matcher, less the same pick unconstrained; the 8 constrained streams' tokens replayed):
**{r['grammar_us_per_token']['as run']} µs** with this schema, **{r['grammar_us_per_token']['without maxLength']} µs**
with the same schema less its `maxLength` (llguidance masks a length-bounded string token by token: the costly
part here).

## (b) Safety filter per streamed token

The output guard over the {r['filter_tokens']} tokens the unconstrained batch-8 streams produced, pushed one token
at a time (hold-back window 64 characters); nothing in them is blocked, so every token is scanned.

{filters}

## Goals

- Constraint overhead at most {r['goals']['constraint_overhead_max']:.0%} of decode time: worst {worst:.1%} \
({'met' if worst <= r['goals']['constraint_overhead_max'] else 'missed'}).
- Filter under {r['goals']['filter_us_max']:.0f} µs per token: worst {filter_worst} µs \
({'met' if filter_worst < r['goals']['filter_us_max'] else 'missed'}).
"""


if __name__ == "__main__":
    main()
