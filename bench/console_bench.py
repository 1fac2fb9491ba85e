"""Benchmark (one run) of the fleet console, `edgectl serve` (issue 18), with N simulated
gateways (default 200) publishing telemetry every second through a private Mosquitto:

 (a) the console's CPU (share of one core) and RSS while it ingests, with no page open, then
     with an overview page and a gateway page open and polling (as an operator has them);
 (b) page load: first contentful paint of the overview and of a gateway page, and the time until
     the overview lists every gateway (chromium, headless, on loopback);
 (c) chart update latency: from a telemetry message's timestamp (taken by the gateway as it
     publishes) to the gateway page's CPU chart drawing that point.

    python bench/console_bench.py [--gateways 200] [--window 30] [--out bench/results/console_bench.json]
                                  [--screenshots docs/]

The simulated gateways speak the fleet protocol as proxy/fleet does (retained presence with a
Last Will, msgpack telemetry with host, GPU, engine and sidecar figures, reports); a few are
made hot, short of memory, offloading, buffering, rejecting config or offline so that the page
has something to flag. Not a test. Needs mosquitto, chromium and playwright.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

SRC = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SRC / "tests"))
from mqtt_harness import Broker  # noqa: E402 - the tests' private Mosquitto

GOAL_CPU_SHARE, GOAL_RSS_MB, GOAL_PAINT_S = 0.10, 150.0, 1.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    sim = sub.add_parser("simulate", help="(internal) run the simulated gateways")
    sim.add_argument("--broker", required=True)
    sim.add_argument("--gateways", type=int, default=200)
    sim.add_argument("--period", type=float, default=1.0)
    p.add_argument("--gateways", type=int, default=200)
    p.add_argument("--period", type=float, default=1.0, help="telemetry period of each gateway (s)")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured in each phase of (a)")
    p.add_argument("--loads", type=int, default=5, help="(b): page loads of each page")
    p.add_argument("--updates", type=int, default=20, help="(c): chart updates timed")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--screenshots", type=Path, help="save console-overview.png and console-gateway.png here")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------- the simulated fleet


def gateway_names(n: int) -> list[str]:
    return [f"gw-{i:03d}" for i in range(n)]


async def simulate(broker: str, n: int, period: float) -> None:
    from proxy.mqtt import MqttClient, MqttConfig, OutMessage

    rng = random.Random(18)
    names = gateway_names(n)
    special = {"hot": names[1], "memory": names[2], "offloading": names[3], "buffered": names[4], "rejecting": names[5],
               "offline": names[6:8]}
    clients = []
    for i, gw in enumerate(names):
        groups = ["site-a" if i % 2 else "site-b"] + (["cameras"] if i % 5 == 0 else [])
        status = {"gateway": gw, "boot": 1 + i % 4, "groups": groups, "version": "0.1.0", "allow_unsigned": False}
        client = MqttClient(MqttConfig(url=broker, keepalive_s=10, reconnect_min_s=0.2, reconnect_max_s=2), gw)
        offline = json.dumps({**status, "state": "offline", "reason": "connection lost", "ts": time.time()}).encode()
        client.will = OutMessage(f"edge/{gw}/status", offline, qos=1, retain=True)
        online = json.dumps({**status, "state": "online", "ts": time.time()}).encode()

        async def hello(client=client, gw=gw, online=online) -> None:
            client.publish(f"edge/{gw}/status", online, qos=1, retain=True)

        client.on_connect(hello)
        await client.start()
        clients.append((gw, i, status, client))
    for gw, _, _, client in clients:
        await client.wait_connected(30)
    for gw in special["offline"]:  # a clean stop: retained offline, no more telemetry
        client = next(c for g, _, _, c in clients if g == gw)
        status = next(s for g, _, s, _ in clients if g == gw)
        await client.stop(final=[OutMessage(f"edge/{gw}/status", json.dumps({**status, "state": "offline", "reason": "shutdown",
                                                                                    "ts": time.time()}).encode(), qos=1, retain=True)])
    report = {"gateway": special["rejecting"], "boot": 1, "ts": time.time(), "target": special["rejecting"], "version": int(time.time() * 1000),
              "signed": True, "status": "rejected", "reasons": {"proxy.rate_limit_requests_per_min": "must be >= 0, got -1"},
              "results": {}, "applied": {}, "needs_restart": []}
    rejecting = next(c for g, _, _, c in clients if g == special["rejecting"])
    await rejecting.publish(f"edge/{special['rejecting']}/config/reported", json.dumps(report).encode(), qos=1, retain=True)
    answering = next(c for g, _, _, c in clients if g == names[9])  # the gateway the screenshots show answers pushes

    def apply(message) -> None:
        doc = json.loads(message.payload) if message.payload else None
        if isinstance(doc, dict) and "version" in doc:
            results = {f"{t}.{k}": "applied" for t, v in doc.get("config", {}).items() for k in v}
            answer = {**report, "gateway": names[9], "ts": time.time(), "target": names[9], "version": doc["version"], "status": "applied",
                      "reasons": {}, "results": results, "applied": {names[9]: doc["version"]}}
            answering.publish(f"edge/{names[9]}/config/reported", json.dumps(answer).encode(), qos=1, retain=True)

    await answering.subscribe(f"edge/{names[9]}/config/desired", apply, qos=1)
    live = [(gw, i, s, c) for gw, i, s, c in clients if gw not in special["offline"]]
    counters = {gw: {"requests": 0, "errors": 0, "hits": 0, "misses": 0, "ttft_sum": 0.0, "ttft_count": 0, "offload": {}} for gw, *_ in live}
    seq = dict.fromkeys(counters, 0)
    start = time.time()
    tick = 0
    while True:
        tick += 1
        for gw, i, status, client in live:
            t = time.time() - start
            c = counters[gw]
            rate = 3 + 2 * math.sin(t / 20 + i)
            served = max(0, int(rng.gauss(rate, 1)))
            c["requests"] += served
            c["errors"] += 1 if rng.random() < 0.03 else 0
            hits = sum(rng.random() < 0.3 for _ in range(served))
            c["hits"] += hits
            c["misses"] += served - hits
            c["ttft_sum"] += served * (0.08 + 0.04 * math.sin(t / 15 + i) + rng.random() * 0.02)
            c["ttft_count"] += served
            share = 0.8 if gw == special["offloading"] else 0.05
            for reason in ("busy", "memory", "thermal"):
                if rng.random() < share / 2:
                    c["offload"][reason] = c["offload"].get(reason, 0) + max(1, int(served * share / 2))
            seq[gw] += 1
            hot = gw == special["hot"]
            message = {
                "v": 1, "gateway": gw, "boot": status["boot"], "seq": seq[gw], "ts": round(time.time(), 3), "period_s": period,
                "host": {"cpu_percent": round(35 + 25 * math.sin(t / 30 + i) + rng.random() * 8, 1), "cpu_count": 4,
                         "mem_percent": 95.5 if gw == special["memory"] else round(50 + 10 * math.sin(t / 60 + i), 1),
                         "mem_total": 8 << 30, "temps_c": {"cpu_thermal/0": round((88 if hot else 55) + 4 * math.sin(t / 25 + i), 1)}},
                "process": {"rss": 90 << 20, "cpu_percent": 4.0, "threads": 12},
                "engine": {"up": True, "queue_depth": max(0, int(rng.gauss(rate / 2, 1))), "running": 2, "max_batch": 4,
                           "tokens_per_s": round(40 + 15 * math.sin(t / 20 + i) + rng.random() * 5, 2),
                           "model": {"id": "smollm2-135m" if i % 3 else "qwen2.5-0.5b"}},
                "proxy": {"requests": c["requests"], "errors": c["errors"], "cache": {"hits": c["hits"], "misses": c["misses"]},
                          "ttft_s": {"sum": round(c["ttft_sum"], 6), "count": c["ttft_count"]}, "offload": dict(c["offload"])},
                "fleet": {"config_versions": {}, "allow_unsigned": False, "buffered": 7 if gw == special["buffered"] else 0,
                          "dropped": 0, "mqtt_connects": 1},
            }
            if i % 4 == 0:  # some gateways have an NVIDIA GPU
                message["gpus"] = [{"index": 0, "name": "NVIDIA L4", "util_percent": round(50 + 30 * math.sin(t / 10 + i)),
                                    "temp_c": 60, "mem_used": 3 << 30, "mem_total": 24 << 30}]
            try:
                client.publish(f"edge/{gw}/telemetry", msgpack.packb(message), qos=1, retain=True)
            except Exception:
                pass
        await asyncio.sleep(max(0.0, start + tick * period - time.time()))


# ---------------------------------------------------------------------------------------------- measuring


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(pid: int, seconds: float) -> dict[str, float]:
    """The console's CPU share of one core and RSS (sampled every second) over `seconds`."""
    cpu0, t0 = proc_cpu_s(pid), time.monotonic()
    rss = []
    while time.monotonic() - t0 < seconds:
        rss.append(rss_mb(pid))
        time.sleep(1.0)
    share = (proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
    return {"cpu_share": round(share, 4), "rss_mb_mean": round(statistics.mean(rss), 1), "rss_mb_max": round(max(rss), 1)}


_OBSERVE_ROWS = """n => new Promise(resolve => {
  const done = () => document.querySelectorAll('#gateways tbody tr').length >= n;
  if (done()) return resolve(performance.now());
  new MutationObserver((_, obs) => { if (done()) { obs.disconnect(); resolve(performance.now()); } })
    .observe(document.body, {childList: true, subtree: true});
})"""
_PAINT = "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
_CHART_LATENCY = """count => new Promise(resolve => {
  const fig = document.querySelector('figure[data-series=cpu]');
  const out = [];
  new MutationObserver(() => {
    const ts = Number(fig.dataset.lastTs);
    if (ts && (!out.length || ts !== out[out.length - 1][0])) out.push([ts, Date.now() / 1000 - ts]);
    if (out.length > count) resolve(out.slice(1).map(x => x[1]));  // the first may be a full load
  }).observe(fig, {attributes: true, attributeFilter: ['data-last-ts']});
})"""


def browse(url: str, chromium: str, n: int, loads: int, updates: int, shots: Path | None, gateway: str) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    out: dict[str, object] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        overview_paint, overview_rows, gateway_paint = [], [], []
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/")
            overview_rows.append(page.evaluate(_OBSERVE_ROWS, n) / 1000)
            overview_paint.append(page.evaluate(_PAINT) / 1000)
            page.close()
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/gateway/{gateway}")
            page.wait_for_selector("figure[data-series=cpu][data-last-ts]")
            gateway_paint.append(page.evaluate(_PAINT) / 1000)
            page.close()
        out["overview_first_paint_s"] = round(statistics.median(overview_paint), 3)
        out["overview_all_rows_s"] = round(statistics.median(overview_rows), 3)
        out["gateway_first_paint_s"] = round(statistics.median(gateway_paint), 3)
        out["loads"] = loads
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/gateway/{gateway}")
        latencies = page.evaluate(_CHART_LATENCY, updates)
        out["chart_latency_s"] = {"median": round(statistics.median(latencies), 3), "p90": round(sorted(latencies)[int(0.9 * len(latencies))], 3),
                                  "max": round(max(latencies), 3), "updates": len(latencies)}
        if shots is not None:
            page.select_option("#window", "300")
            page.get_by_role("button", name="Push").click()  # the default edit: a rate limit, signed, applied
            page.wait_for_selector('#push-result[data-outcome="applied"]')
            page.wait_for_selector("#pushes tbody tr[data-version]")
            page.screenshot(path=str(shots / "console-gateway.png"), full_page=True)
            page.goto(f"{url}/")
            page.wait_for_selector(f"#gateways tbody tr >> nth={n - 1}")
            page.get_by_role("button", name="Health").click()
            page.get_by_role("button", name="Health").click()  # most flags first
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "console-overview.png"))
        browser.close()
    return out


def main() -> None:
    args = parse_args()
    if args.mode == "simulate":
        asyncio.run(simulate(args.broker, args.gateways, args.period))
        return
    import benchlib

    machine = benchlib.machine_info()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker")
        broker.start()
        subprocess.run([sys.executable, "-m", "edgectl", "keygen", str(work / "ctl")], env=env, check=True, capture_output=True)
        sim = subprocess.Popen([sys.executable, __file__, "simulate", "--broker", broker.url, "--gateways", str(args.gateways),
                                "--period", str(args.period)], env=env, stderr=open(work / "sim.log", "wb"))
        console = subprocess.Popen([sys.executable, "-m", "edgectl", "--broker", broker.url, "serve", "--port", "0",
                                    "--key", str(work / "ctl.key"), "--db", str(work / "console.sqlite3")],
                                   env=env, stdout=subprocess.PIPE, stderr=open(work / "console.log", "wb"), text=True)
        try:
            url = console.stdout.readline().split("console on ", 1)[1].split(" ", 1)[0].rstrip("/")
            import urllib.request

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # every gateway seen, telemetry flowing
                body = json.load(urllib.request.urlopen(f"{url}/api/v1/gateways"))
                if body["counts"]["total"] >= args.gateways and body["counts"]["online"] >= args.gateways - 2:
                    break
                time.sleep(1)
            time.sleep(5)  # settle: the retained burst is in
            ingest = measure(console.pid, args.window)
            from threading import Thread

            pages: dict[str, object] = {}
            gateway = gateway_names(args.gateways)[9]
            browsing = Thread(target=lambda: pages.update(browse(url, args.chromium, args.gateways, args.loads, args.updates,
                                                                 args.screenshots, gateway)))
            browsing.start()
            with_pages = measure(console.pid, args.window)
            browsing.join()
            db_mb = round(sum(f.stat().st_size for f in work.glob("console.sqlite3*")) / 2**20, 1)  # with its write-ahead log
        finally:
            console.terminate()
            sim.terminate()
            console.wait(30)
            sim.wait(30)
            broker.stop()
    data = {"gateways": args.gateways, "period_s": args.period, "window_s": args.window, "ingest_only": ingest, "with_pages": with_pages,
            "pages": pages, "db_mb_after": db_mb, "machine": machine, "command": benchlib.command_line()}
    worst_cpu = max(ingest["cpu_share"], with_pages["cpu_share"])
    worst_rss = max(ingest["rss_mb_max"], with_pages["rss_mb_max"])
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    md = ["# Fleet console benchmark (issue 18)\n", f"Command: `{data['command']}`  ",
          f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} CPUs usable, {machine['mem_total_gib']} GiB, Python {machine['python']}; "
          f"load {machine['load_avg_1m_at_start']} at start (other work kept {machine['cpu_busy_at_start']:.0%} of the CPUs busy).\n",
          f"{args.gateways} simulated gateways (one process, one MQTT connection each) publish msgpack telemetry every {args.period:g} s "
          f"through a private Mosquitto; `edgectl serve --key ... --db FILE` ingests it (SQLite on disk).\n",
          "## (a) Console CPU and memory\n",
          benchlib.markdown_table(["phase", "% of one core", "RSS MB mean", "RSS MB max"],
                                  [["ingest only", f"{ingest['cpu_share']:.1%}", ingest["rss_mb_mean"], ingest["rss_mb_max"]],
                                   ["ingest + overview and gateway pages polling, page loads", f"{with_pages['cpu_share']:.1%}",
                                    with_pages["rss_mb_mean"], with_pages["rss_mb_max"]]]),
          f"\nHistory file after the run: {db_mb} MB.\n",
          "## (b) Page load (headless chromium, loopback; median of " + str(args.loads) + " loads)\n",
          benchlib.markdown_table(["page", "first contentful paint s", "all rows listed s"],
                                  [["overview", pages["overview_first_paint_s"], pages["overview_all_rows_s"]],
                                   ["gateway", pages["gateway_first_paint_s"], "–"]]),
          "\n## (c) Chart update latency (telemetry timestamp -> point drawn; the page polls every 1 s)\n",
          benchlib.markdown_table(["median s", "p90 s", "max s", "updates"],
                                  [[pages["chart_latency_s"]["median"], pages["chart_latency_s"]["p90"], pages["chart_latency_s"]["max"],
                                    pages["chart_latency_s"]["updates"]]]),
          "\n## Goals\n",
          benchlib.markdown_table(["goal", "measured", "verdict"],
                                  [["< 10% of one core", f"{worst_cpu:.1%}", verdict(worst_cpu < GOAL_CPU_SHARE)],
                                   ["< 150 MB", f"{worst_rss} MB", verdict(worst_rss < GOAL_RSS_MB)],
                                   ["first paint < 1 s", f"{max(pages['overview_first_paint_s'], pages['gateway_first_paint_s'])} s",
                                    verdict(max(pages["overview_first_paint_s"], pages["gateway_first_paint_s"]) < GOAL_PAINT_S)]])]
    benchlib.report(args.out, data, "\n".join(md))


if __name__ == "__main__":
    main()
