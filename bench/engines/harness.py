"""What every engine runner shares: its command line, the timed runs (one warm-up, then the
median of a few) and the one JSON line it prints. Runners run in other virtualenvs too, so
this needs only the standard library.

Every engine does the same work per run, greedy and from an empty KV cache: prefill the
prompt and pick the first token (the TTFT), then gen_tokens - 1 decode steps, each a forward
of the previous token and an argmax. The last token picked is never fed back."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

FIRST_TOKENS = 12  # generated tokens shown for a sanity check


@dataclass
class Run:
    ttft_s: float  # prefill + picking the first token
    decode_s: float  # first token picked to last token picked
    tokens: list[int]


class Engine(Protocol):
    version: str

    def run(self, prompt_ids: list[int], gen_tokens: int) -> Run: ...

    def token_text(self, token_id: int) -> str: ...


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--name", required=True, help="engine label in the output")
    p.add_argument("--model", type=Path, required=True, help="model file or directory")
    p.add_argument("--prompt-ids", type=Path, required=True, help="JSON file: list of token ids")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM): ru_maxrss would carry the parent's
    high-water mark across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (no /proc elsewhere)


def summarize(name: str, engine: Engine, prompt_ids: list[int], runs: list[Run]) -> dict[str, object]:
    generated = len(runs[0].tokens)
    ttft = statistics.median(r.ttft_s for r in runs)
    decode = statistics.median(r.decode_s for r in runs)
    first = runs[0].tokens[:FIRST_TOKENS]
    return {
        "engine": name,
        "version": engine.version,
        "prompt_tokens": len(prompt_ids),
        "gen_tokens": generated,
        "prefill_tok_s": len(prompt_ids) / ttft,
        "decode_tok_s": (generated - 1) / decode,
        "ttft_s": ttft,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "first_ids": first,
        "first_tokens": [engine.token_text(t) for t in first],
        "runs": [{"ttft_s": r.ttft_s, "decode_s": r.decode_s} for r in runs],
        "same_tokens_every_run": all(r.tokens == runs[0].tokens for r in runs),
    }


def main(description: str, load: Callable[[argparse.Namespace], Engine]) -> None:
    """Parse the command line, load the engine, warm it up, time it, print one JSON line."""
    args = parse_args(description)
    prompt_ids = json.loads(args.prompt_ids.read_text())
    engine = load(args)
    engine.run(prompt_ids, args.gen_tokens)  # warm-up
    runs = [engine.run(prompt_ids, args.gen_tokens) for _ in range(args.repeats)]
    print(json.dumps(summarize(args.name, engine, prompt_ids, runs)), flush=True)
