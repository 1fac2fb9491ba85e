"""Benchmark (one run): the typed-message library for the request schemas and config tables,
msgspec vs pydantic v2, on the same shape with the same rules: parse + validate of a typical chat
request (JSON bytes to a typed object), and each library's import time and resident memory in a
fresh interpreter (the sidecar's idle RSS and cold start are goals of their own).

    python bench/schema_libs.py [--repeat 5] [--number 20000] [--out bench/results/schema_libs.json]

Not a test; pydantic is not a project dependency (`pip install pydantic` to run it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import benchlib
import msgspec
import pydantic
from msgspec import Meta
from pydantic import BaseModel, ConfigDict, Field

BODY = json.dumps({"model": "smollm2-135m-instruct", "messages": [
    {"role": "system", "content": "You are a helpful assistant on a gateway."},
    {"role": "user", "content": "What is the temperature in the server room? Answer briefly."}],
    "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "stream": True, "stop": ["\n\n"], "seed": 42}).encode()
ROLE = Literal["system", "developer", "user", "assistant", "tool"]


class MsgspecMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: ROLE
    content: Union[str, None] = None
    name: Optional[str] = None


class MsgspecChat(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[MsgspecMessage], Meta(min_length=1, max_length=256)]
    max_tokens: Optional[Annotated[int, Meta(ge=1, le=2**31 - 1)]] = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None


class PydanticMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: ROLE
    content: Optional[str] = None
    name: Optional[str] = None


class PydanticChat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[PydanticMessage] = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None


IMPORT_PROBE = """
import time
start = time.perf_counter()
import {module}
elapsed = time.perf_counter() - start
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
print(elapsed, rss)
"""
BARE_PROBE = 'print(int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]))'


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (the best is kept)")
    p.add_argument("--number", type=int, default=20000, help="parses per round")
    p.add_argument("--imports", type=int, default=5, help="fresh interpreters per library (median kept)")
    p.add_argument("--out", type=Path, help="write results here (JSON, plus a .md summary)")
    return p.parse_args()


def import_cost(module: str, runs: int) -> dict[str, float]:
    """Median import time and RSS added over a bare interpreter, each in a fresh process."""
    bare = sorted(int(subprocess.run([sys.executable, "-c", BARE_PROBE], capture_output=True, text=True).stdout)
                  for _ in range(runs))[runs // 2]
    probes = [subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(module=module)], capture_output=True,
                             text=True, check=True).stdout.split() for _ in range(runs)]
    times = sorted(float(t) for t, _ in probes)
    rss = sorted(int(r) for _, r in probes)
    return {"import_ms": round(1000 * times[runs // 2], 1), "rss_added_mb": round((rss[runs // 2] - bare) / 1024, 1)}


def main() -> None:
    args = parse_args()
    decode = msgspec.json.Decoder(MsgspecChat).decode
    assert decode(BODY).temperature == PydanticChat.model_validate_json(BODY).temperature
    parsers = {"msgspec": lambda: decode(BODY), "pydantic": lambda: PydanticChat.model_validate_json(BODY)}
    results: dict[str, dict[str, float]] = {}
    for name, parse in parsers.items():
        best = min(timeit.repeat(parse, number=args.number, repeat=args.repeat)) / args.number
        results[name] = {"parse_validate_us": round(best * 1e6, 3), **import_cost(name, args.imports)}
    versions = {"msgspec": msgspec.__version__, "pydantic": pydantic.__version__}
    machine = benchlib.machine_info()
    rows = [[f"{name} {versions[name]}", r["parse_validate_us"], r["import_ms"], r["rss_added_mb"]]
            for name, r in results.items()]
    markdown = "\n".join([
        "# Schema library: msgspec vs pydantic v2", "",
        f"Command: `{benchlib.command_line()}`", "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} CPUs", "",
        benchlib.markdown_table(["library", "parse+validate of a chat request (us)", "import (ms)", "RSS added (MB)"], rows),
        "",
    ])
    benchlib.report(args.out, {"command": benchlib.command_line(), "machine": machine,
                               "versions": versions, "results": results}, markdown)


if __name__ == "__main__":
    main()
