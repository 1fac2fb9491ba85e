"""Soak: N minutes at saturation through the sidecar, sampling the resident memory (RSS) and the
open file descriptors of the engine and the sidecar; reports their slope after a warm-up (issue
15's goal: flat within 2% over 30 minutes).

    python bench/soak.py --minutes 30 [--model smollm2-135m-instruct | --model tiny] \
        [--concurrency 16] [--warmup-minutes 5] [--out bench/results/soak-smollm2-135m-30min.json]

Both run as the child processes systemd would run (`edge-runtime serve`, `edge-proxy`); the
engine's READY=1 comes through NOTIFY_SOCKET, the sidecar's readiness from /readyz. Saturation:
`--concurrency` clients (default twice the engine's batch) post chat completions back to back,
half of them streamed, each with its own prompt and temperature 0.7 (never a response-cache hit),
so the engine's queue is never empty. `--model tiny` builds a small random model of the test
suite's shape (needs torch and transformers: the test extras) for a run whose cost is the
runtime's own, not the model's."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import CACHE_DIR, command_line, machine_info, markdown_table, report

from edge_runtime.models import DEFAULT_MODEL, resolve_model

READY_TIMEOUT_S = 300.0
MAX_TOKENS = 32


def tiny_model() -> Path:
    """The test suite's tiny llama (tests/conftest.py), built once into bench/.cache."""
    out = CACHE_DIR / "models" / "tiny-llama"
    if not (out / "manifest.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_tiny_checkpoint

        from edge_runtime.builder.build import BuildOptions, build

        make_tiny_checkpoint(CACHE_DIR / "checkpoints" / "tiny-llama", "llama")
        build(CACHE_DIR / "checkpoints" / "tiny-llama", out, BuildOptions(), quiet=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, model_dir: Path, max_batch: int | None = None,
          quiet_logs: bool = True) -> tuple[subprocess.Popen, subprocess.Popen, str, str]:
    """(engine, sidecar, base URL, model id), both ready. Their config sets the socket path and
    nothing else, but for max_batch when given and, with quiet_logs, warnings only and no
    access log; the rest is the built-in defaults."""
    config = tmp / "config.toml"
    sock = tmp / "engine.sock"
    engine_keys = [f'socket_path = "{sock}"']
    proxy_keys = []
    if quiet_logs:
        engine_keys.append('log_level = "warning"')
        proxy_keys += ['log_level = "warning"', "access_log = false"]
    if max_batch is not None:
        engine_keys.append(f"max_batch = {max_batch}")
    config.write_text("\n".join(["[engine]", *engine_keys, "", "[proxy]", *proxy_keys, ""]))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(READY_TIMEOUT_S)
    logs = open(tmp / "children.log", "ab")  # noqa: SIM115 (the children hold it until they exit)
    engine = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config), "--model", str(model_dir)],
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock")}, stderr=logs)
    while "READY=1" not in notify.recv(4096).decode().splitlines():
        pass
    notify.close()
    port = free_port()
    sidecar = subprocess.Popen([sys.executable, "-m", "proxy.main", "--config", str(config), "--port", str(port)], stderr=logs)
    base = f"http://127.0.0.1:{port}"
    return engine, sidecar, base, asyncio.run(_wait_ready(base))


def stop(*children: subprocess.Popen) -> None:
    for child in children:
        child.terminate()
        child.wait(60)


async def _wait_ready(base: str) -> str:
    """The model's id once /readyz says ready."""
    async with aiohttp.ClientSession() as session:
        end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < end:
            try:
                async with session.get(f"{base}/readyz") as answer:
                    if answer.status == 200:
                        return (await answer.json())["model"]
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    sys.exit(f"sidecar not ready after {READY_TIMEOUT_S:g} s")


def sample(process: psutil.Process) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors)."""
    return process.memory_info().rss / 2**20, process.num_fds()


async def load(base: str, model: str, concurrency: int, seconds: float, interval_s: float,
               procs: dict[str, psutil.Process]) -> tuple[list[dict], dict[str, int]]:
    """Saturate for `seconds`, sampling every `interval_s`; (samples, outcome counts)."""
    outcomes = {"ok": 0, "failed": 0}
    numbers = itertools.count()
    end = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            n = next(numbers)
            body = {"model": model, "messages": [{"role": "user", "content": f"Request {n}: name a colour and a number."}],
                    "max_tokens": MAX_TOKENS, "temperature": 0.7, "stream": n % 2 == 0}
            try:
                async with session.post(f"{base}/v1/chat/completions", json=body) as answer:
                    await answer.read()
                    outcomes["ok" if answer.status == 200 else "failed"] += 1
            except aiohttp.ClientError:
                outcomes["failed"] += 1

    async def sampler() -> list[dict]:
        samples, start = [], time.monotonic()
        while time.monotonic() < end:
            row = {"t_s": round(time.monotonic() - start, 1), "requests_ok": outcomes["ok"]}
            for name, process in procs.items():
                row[f"{name}_rss_mib"], row[f"{name}_fds"] = sample(process)
            samples.append(row)
            await asyncio.sleep(interval_s)
        return samples

    limit = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=limit, timeout=aiohttp.ClientTimeout(total=120)) as session:
        samples, *_ = await asyncio.gather(sampler(), *(client(session) for _ in range(concurrency)))
    return samples, outcomes


def slope(samples: list[dict], key: str, after_s: float) -> dict[str, float]:
    """Least-squares line through the samples after the warm-up: its change over that window, in
    units and in percent of the fitted start."""
    points = [(s["t_s"], s[key]) for s in samples if s["t_s"] >= after_s]
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points) or 1e-9
    k = sum((t - mean_t) * (v - mean_v) for t, v in points) / var
    span = points[-1][0] - points[0][0]
    start = mean_v + k * (points[0][0] - mean_t)
    return {"per_min": round(k * 60, 4), "over_window": round(k * span, 3),
            "percent": round(100 * k * span / start, 2) if start else 0.0, "min": round(min(v for _, v in points), 1),
            "max": round(max(v for _, v in points), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, help="not counted in the slope (default: a sixth of the run)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a recipe, a built model directory, or tiny (default {DEFAULT_MODEL})")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--concurrency", type=int, help="clients at once (default: twice --max-batch)")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    concurrency = args.concurrency or 2 * args.max_batch
    warmup_min = args.minutes / 6 if args.warmup_minutes is None else args.warmup_minutes
    machine = machine_info()
    model_dir = tiny_model() if args.model == "tiny" else resolve_model(args.model, quiet=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        engine, sidecar, base, model = start(Path(tmp), model_dir, args.max_batch)
        try:
            procs = {"engine": psutil.Process(engine.pid), "sidecar": psutil.Process(sidecar.pid)}
            samples, outcomes = asyncio.run(load(base, model, concurrency, args.minutes * 60, args.sample_s, procs))
        finally:
            stop(sidecar, engine)
    after_s = warmup_min * 60
    slopes = {f"{name}_{what}": slope(samples, f"{name}_{what}", after_s)
              for name in ("engine", "sidecar") for what in ("rss_mib", "fds")}
    flat = all(abs(s["percent"]) <= 2.0 for s in slopes.values())
    data = {"command": command_line(), "machine": machine, "model": args.model, "minutes": args.minutes,
            "warmup_minutes": warmup_min, "concurrency": concurrency, "max_batch": args.max_batch, "max_tokens": MAX_TOKENS,
            "outcomes": outcomes, "requests_per_s": round(outcomes["ok"] / (args.minutes * 60), 2),
            "slopes_after_warmup": slopes, "flat_within_2_percent": flat, "samples": samples}
    rows = [[key, s["min"], s["max"], s["per_min"], s["over_window"], f"{s['percent']}%"] for key, s in slopes.items()]
    markdown = "\n\n".join([
        f"# Soak: {args.model}, {args.minutes:g} min at saturation through the sidecar",
        f"`{command_line()}`",
        (f"{concurrency} clients back to back (max_batch {args.max_batch}, {MAX_TOKENS} tokens, half streamed): "
        f"{outcomes['ok']} requests answered 200 ({data['requests_per_s']}/s), {outcomes['failed']} failed. "
        f"Slope after a {warmup_min:.3g} min warm-up: **{'flat' if flat else 'NOT flat'} within 2%**."),
        markdown_table(["series", "min", "max", "per min", "over the window", "change"], rows),
        (f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, load {machine['load_avg_1m_at_start']} "
        f"at start (other work kept {machine['cpu_busy_at_start']:.0%} of the CPUs busy)."),
    ])
    report(args.out, data, markdown)


if __name__ == "__main__":
    main()
