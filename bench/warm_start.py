"""Warm start: how long `edge-runtime serve` takes to send READY=1, and how fast the first burst
of concurrent streams after that is compared with a later identical burst (issue 15: the first
use of each batch size used to cost ONNX Runtime about 0.9 s).

    python bench/warm_start.py [--model smollm2-135m-instruct] [--streams 8] [--bursts 3] [--starts 3] \
        [--out bench/results/warm_start.json]

Each setting of `[engine] warm_shapes` (off: the anchor; on: the default) is started --starts
times, alternately, in one run.

The engine runs as the child process systemd would run, with NOTIFY_SOCKET pointing at a datagram
socket of this script, so "ready" is the moment READY=1 arrives, not a guess. Each burst sends
`--streams` generate requests at once (greedy, fixed token count) on one connection and times
until the last done frame. The prefix cache is off: with it, a later burst would skip prefilling
the chat template's system prompt, which the first burst cached, and look faster for that."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import command_line, machine_info, markdown_table, report  # noqa: E402
from edge_runtime.client import EngineClient  # noqa: E402
from edge_runtime.models import DEFAULT_MODEL, resolve_model  # noqa: E402

READY_TIMEOUT_S = 300.0


def start_engine(model_dir: Path, sock: Path, notify_path: Path, max_batch: int, warm_shapes: bool) -> tuple[subprocess.Popen, float]:
    """(the engine process, seconds from spawn to READY=1)."""
    config = notify_path.with_name("config.toml")
    config.write_text(f"[engine]\nwarm_shapes = {str(warm_shapes).lower()}\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(READY_TIMEOUT_S)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    cmd = [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", str(model_dir), "--socket", str(sock),
           "--max-batch", str(max_batch), "--log-level", "warning", "--prefix-cache-mb", "0", "--config", str(config)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        while True:
            message = listener.recv(4096).decode()
            if "READY=1" in message.splitlines():
                return proc, time.perf_counter() - start
    except TimeoutError:
        proc.kill()
        sys.exit(f"engine not ready after {READY_TIMEOUT_S:g} s")
    finally:
        listener.close()


async def burst(sock: Path, engine: psutil.Process, streams: int, max_tokens: int, round_no: int) -> dict[str, float]:
    """`streams` greedy requests at once: seconds to the last done frame, the engine's CPU
    seconds meanwhile (the figure other work on a shared machine disturbs least), tokens made."""
    async with await EngineClient.connect(sock) as client:
        async def one(i: int) -> int:
            tokens = 0
            messages = [{"role": "user", "content": f"Tell me fact number {i} of set {round_no} about lighthouses."}]
            params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            async for frame in client.generate(messages=messages, params=params, id=f"r{round_no}-{i}"):
                tokens += frame["type"] == "token"
            return tokens

        cpu_start, start = _cpu_s(engine), time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        elapsed, cpu = time.perf_counter() - start, _cpu_s(engine) - cpu_start
    return {"seconds": round(elapsed, 3), "engine_cpu_s": round(cpu, 3), "tokens": sum(counts),
            "tokens_per_s": round(sum(counts) / elapsed, 1)}


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_once(model_dir: Path, args: argparse.Namespace, warm_shapes: bool, start_no: int) -> dict[str, object]:
    """One engine start: seconds to READY=1, its bursts, and the first burst's speed relative to
    the best later one (by wall clock and by the engine's CPU time)."""
    with tempfile.TemporaryDirectory() as tmp:
        sock, notify_path = Path(tmp) / "engine.sock", Path(tmp) / "notify.sock"
        proc, ready_s = start_engine(model_dir, sock, notify_path, args.streams, warm_shapes)
        try:
            engine = psutil.Process(proc.pid)
            bursts = [asyncio.run(burst(sock, engine, args.streams, args.max_tokens, start_no * 100 + n))
                      for n in range(args.bursts)]
        finally:
            proc.terminate()
            proc.wait(60)
    return {"warm_shapes": warm_shapes, "ready_s": round(ready_s, 3), "bursts": bursts,
            "first_vs_later": round(min(b["seconds"] for b in bursts[1:]) / bursts[0]["seconds"], 3),
            "first_vs_later_cpu": round(min(b["engine_cpu_s"] for b in bursts[1:]) / bursts[0]["engine_cpu_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3, help="engine starts of each setting, alternated (medians)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    machine = machine_info()
    model_dir = resolve_model(args.model, quiet=True)  # built before timing: the build is not the start
    # The anchor is the same tree with the shape warm-up off, started alternately with it on.
    runs = [run_once(model_dir, args, warm, n * 2 + warm) for n in range(args.starts) for warm in (False, True)]
    rows = []
    for warm in (False, True):
        mine = [r for r in runs if r["warm_shapes"] == warm]
        rows.append([f"warm_shapes = {str(warm).lower()}", statistics.median(r["ready_s"] for r in mine),
                     statistics.median(r["first_vs_later"] for r in mine), statistics.median(r["first_vs_later_cpu"] for r in mine),
                     " ".join(f"{r['first_vs_later']:.2f}" for r in mine)])
    data = {"command": command_line(), "machine": machine, "model": args.model, "streams": args.streams,
            "max_tokens": args.max_tokens, "runs": runs}
    markdown = "\n\n".join([
        f"# Warm start: {args.model}, bursts of {args.streams} streams x {args.max_tokens} tokens, "
        f"{args.starts} starts of each setting (medians)",
        f"`{command_line()}`",
        markdown_table(["engine", "start to READY=1, s", "first burst vs best later (wall)",
                        "first burst vs best later (engine CPU)", "each start (wall)"], rows),
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, load {machine['load_avg_1m_at_start']} "
        f"at start (other work kept {machine['cpu_busy_at_start']:.0%} of the CPUs busy).",
    ])
    report(args.out, data, markdown)


if __name__ == "__main__":
    main()
