"""Aggregate decode tokens/s of N concurrent streamed chat completions through the sidecar's
OpenAI API against one stream, engine and sidecar on their default config (issue 16's goal: with
defaults, 8 streams at least 3x one stream).

    python bench/sidecar_streams.py [--model smollm2-135m-instruct | --model tiny] [--streams 1,2,4,8]
        [--rounds 3] [--max-tokens 128] [--wait-idle 300] [--max-discards 10]
        [--out bench/results/sidecar_streams-smollm2-135m.json]

Engine and sidecar run as the child processes systemd would run (soak.py's start()), with a config
that sets the engine's socket path and nothing else: max_batch, the KV budget, the prefix and
response caches, threads and logging are the built-in defaults. Each stream is a chat completion
with a user text no other request had (its request number comes first), so neither the response
cache nor the prefix cache answers it; temperature 0, `stream_options.include_usage`. The decode
rate is serve_bench.py's (a): tokens arriving while every stream decodes / that window."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib
import soak
from serve_bench import GOAL_SCALING, GOAL_STREAMS, StreamResult, round_figures

from edge_runtime.client import EngineClient
from edge_runtime.models import DEFAULT_MODEL, resolve_model

REQUEST_TIMEOUT_S = 600.0
NUMBERS = itertools.count(1)  # request numbers: every request's user text is new


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a recipe, a built model directory, or tiny (default {DEFAULT_MODEL})")
    p.add_argument("--streams", default="1,2,4,8", help="concurrency levels, comma separated (1 is the reference)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per level (median), after a warm-up round")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true",
                   help="the engine's ignore_eos extension: every stream runs to --max-tokens (default: the model may stop early)")
    p.add_argument("--wait-idle", type=float, default=300,
                   help="before each level, wait up to this many seconds for other work on the CPUs to drop under "
                        f"{100 * benchlib.BUSY:.0f}%% (0: do not wait; the \"other work\" column shows disturbed rounds)")
    p.add_argument("--max-discards", type=int, default=10, help="rounds per level measured again because other work disturbed them")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    args = p.parse_args()
    args.stream_counts = [int(x) for x in args.streams.split(",")]
    if 1 not in args.stream_counts:
        p.error("--streams needs 1: the other levels are compared with it")
    return args


def user_text(n: int) -> str:
    return f"Request {n}: write a long story, in many paragraphs, about a lighthouse keeper and ship number {n}."


async def stream(session: aiohttp.ClientSession, base: str, model: str, args: argparse.Namespace) -> StreamResult:
    """One streamed chat completion: when each content delta (one token) arrived, and the tokens
    the usage chunk counts."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": user_text(next(NUMBERS))}],
                            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    result = StreamResult(time.perf_counter())
    async with session.post(f"{base}/v1/chat/completions", json=body) as answer:
        if answer.status != 200:
            raise RuntimeError(f"the sidecar answered {answer.status}: {(await answer.text())[:500]}")
        async for line in answer.content:
            if not line.startswith(b"data: {"):
                continue  # blank separators and the closing [DONE]
            now = time.perf_counter()
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"a stream failed: {event['error']}")
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                result.token_times.append((now, 1))
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
                # A token that added no text (held back, or the last) counts when the usage comes.
                missing = result.completion_tokens - sum(n for _, n in result.token_times)
                if missing > 0:
                    result.token_times.append((now, missing))
    if len(result.token_times) < 2:
        raise SystemExit(f"a stream ended after {result.completion_tokens} token(s): raise --max-tokens or pass --ignore-eos")
    return result


async def level(n: int, session: aiohttp.ClientSession, base: str, model: str, pids: list[int],
                args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up round, then args.rounds rounds of n streams sent at once; medians (as
    serve_bench.throughput), the other work's share and both servers' RSS after."""
    what = f"{n} streams"

    def one_round() -> asyncio.Future[list[StreamResult]]:
        return asyncio.gather(*(stream(session, base, model, args) for _ in range(n)))

    await benchlib.wait_idle(pids, args.wait_idle, what)
    await one_round()
    rounds, discarded = [], 0
    for _ in range(args.rounds):
        results, busy, dropped = await benchlib.undisturbed(pids, args.wait_idle, args.max_discards, what, one_round)
        rounds.append({**round_figures(list(results)), "cpu_busy_with_other_work": round(busy, 3)})
        discarded += dropped
    # No decode window (nan) where the streams never all decoded at once: the engine queued some.
    overlapped = [r["decode_tok_s"] for r in rounds if r["decode_tok_s"] == r["decode_tok_s"]]
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "decode_tok_s"}
    summary.update(decode_tok_s=statistics.median(overlapped) if overlapped else None, streams=n, rounds=rounds,
                   cpu_busy_with_other_work=max(r["cpu_busy_with_other_work"] for r in rounds), discarded_rounds=discarded)
    print(f"{n:2d} streams: {summary['decode_tok_s'] or float('nan'):.1f} tok/s decode aggregate, "
          f"{summary['end_to_end_tok_s']:.1f} end to end, mean TTFT {1000 * summary['mean_ttft_s']:.0f} ms, "
          f"other work {100 * summary['cpu_busy_with_other_work']:.0f}%", file=sys.stderr, flush=True)
    return summary


async def measure(base: str, model: str, socket_path: Path, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    client = await EngineClient.connect(socket_path)
    try:
        status = await client.status()  # the engine's own account of its (default) settings
    finally:
        await client.close()
    levels = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        for n in args.stream_counts:
            levels.append({**await level(n, session, base, model, pids, args),
                           "rss_mb_after": {"engine": benchlib.rss_mb(pids[0]), "sidecar": benchlib.rss_mb(pids[1])}})
    return {"engine_status": status, "levels": levels}


def ratios(levels: list[dict[str, Any]]) -> None:
    """Each level's decode and end-to-end rates over the 1-stream level's, in place."""
    one = next(r for r in levels if r["streams"] == 1)
    for r in levels:
        r["decode_vs_1"] = r["decode_tok_s"] / one["decode_tok_s"] if r["decode_tok_s"] and one["decode_tok_s"] else None
        r["end_to_end_vs_1"] = r["end_to_end_tok_s"] / one["end_to_end_tok_s"]


def goals(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at = next((r for r in levels if r["streams"] == GOAL_STREAMS), None)
    scaling = at["decode_vs_1"] if at else None
    if at is None:
        value = f"not measured (--streams has no {GOAL_STREAMS})"
    elif scaling is None:
        value = "no window in which all streams decoded"
    else:
        value = f"{scaling:.2f}x"
    return [{"goal": f"with defaults, {GOAL_STREAMS} streams through the sidecar >= {GOAL_SCALING:g}x one stream "
                     "(aggregate decode tok/s)", "value": value, "met": scaling is not None and scaling >= GOAL_SCALING}]


def engine_settings(status: dict[str, Any]) -> str:
    """The engine's own account of the settings that bound concurrency (its status frame)."""
    kv, prefix = status.get("kv", {}), status.get("prefix_cache", {})
    return (f"max_batch {status.get('max_batch')}, max_context {kv.get('max_context')}, "
            f"KV budget {kv.get('budget_bytes', 0) / 2**20:.0f} MiB, prefix cache {prefix.get('limit_bytes', 0) / 2**20:.0f} MiB")


def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    rows = [[r["streams"], fmt(r["decode_tok_s"]), fmt(r["decode_vs_1"], ".2f", "x"), fmt(r["end_to_end_tok_s"]),
             fmt(r["end_to_end_vs_1"], ".2f", "x"), fmt(r["per_stream_tok_s"]), fmt(1000 * r["mean_ttft_s"], ".0f"),
             r["min_stream_tokens"], fmt(r["rss_mb_after"]["engine"]["VmRSS"], ".0f"),
             fmt(r["rss_mb_after"]["sidecar"]["VmRSS"], ".0f"),
             f"{100 * r['cpu_busy_with_other_work']:.0f}% ({r['discarded_rounds']} discarded)"] for r in report["levels"]]
    headers = ["streams", "decode tok/s", "vs 1 stream", "end-to-end tok/s", "vs 1 stream", "per-stream tok/s",
               "mean TTFT ms", "fewest tokens in a stream", "engine RSS MB after", "sidecar RSS MB after", "other work"]
    return "\n".join([
        f"# Concurrent streams through the sidecar, default config: {s['model']}", "",
        (f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['mem_total_gib']} GiB "
        f"({100 * m['cpu_busy_at_start']:.0f}% busy with other work at start)."), "",
        f"Command: `{report['command']}`", "",
        (f"`edge-runtime serve` and `edge-proxy` as child processes, their config setting only the engine's socket "
         f"(everything else the built-in defaults; the engine reports {engine_settings(report['engine_status'])}). Each round "
         f"sends N streamed `/v1/chat/completions` at once, each with its own user text (a new request number, so no "
         f"response-cache or prefix-cache hit), temperature 0, `max_tokens` {s['max_tokens']}"
         f"{', `ignore_eos`' if s['ignore_eos'] else ' (a stream may stop at EOS: tokens counted as received)'}; "
         f"median of {s['rounds']} rounds after a warm-up round. \"decode tok/s\" is the aggregate rate while every "
         "stream decodes (last stream's first token to first stream's last token; tokens arriving in that window / "
         "its length); \"end-to-end\" is all tokens / (last token - send). Before each level the harness waited (up to "
         f"{s['wait_idle_s']:g} s) for other work under {100 * benchlib.BUSY:.0f}% of the CPUs and measured again a "
         "round that other work disturbed; \"other work\" is the most any kept round saw."), "",
        benchlib.markdown_table(headers, rows), "",
        "## Goals", "",
        benchlib.markdown_table(["goal", "measured", "met"],
                                [[g["goal"], g["value"], "yes" if g["met"] else "**no**"] for g in report["goals"]]),
    ]).rstrip() + "\n"


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the servers are stopped
    machine = benchlib.machine_info()
    if machine["cpu_busy_at_start"] > benchlib.BUSY:
        print(f"warning: {100 * machine['cpu_busy_at_start']:.0f}% of the CPUs busy with other work", file=sys.stderr)
    model_dir = soak.tiny_model() if args.model == "tiny" else resolve_model(args.model, quiet=True)
    with tempfile.TemporaryDirectory(prefix="sidecar_streams-") as tmp:
        children: list[subprocess.Popen] = []
        try:
            engine, sidecar, base, model = soak.start(Path(tmp), model_dir, quiet_logs=False)
            children = [sidecar, engine]
            config = (Path(tmp) / "config.toml").read_text()
            measured = asyncio.run(measure(base, model, Path(tmp) / "engine.sock", [engine.pid, sidecar.pid], args))
        finally:
            soak.stop(*children)
    ratios(measured["levels"])
    report = {"command": benchlib.command_line(), "machine": machine,
              "settings": {"model": args.model, "model_dir": str(model_dir), "streams": args.stream_counts,
                           "rounds": args.rounds, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
                           "wait_idle_s": args.wait_idle, "max_discards": args.max_discards, "config": config},
              **measured}
    report["goals"] = goals(report["levels"])
    for g in report["goals"]:
        print(f"goal: {g['goal']}: {g['value']} ({'met' if g['met'] else 'NOT met'})", file=sys.stderr)
    benchlib.report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
