"""How a model build shows its progress: on a terminal, one line per step rewritten in place
(`edge-runtime build`, `generate`, `chat`); in a daemon (`edge-runtime serve`, also under `up`),
structured log lines on stderr and systemd's STATUS= line, so that the first start, which builds
the default model, does not look hung. Steps shorter than a second show nothing."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

from ..sd_notify import notify

log = logging.getLogger("edge_runtime.build")

StepReport = Callable[[int, int], None]  # (done, total) of one step
Progress = Callable[[str], StepReport]  # a step's label -> its reporter


def _throttled(label: str, every_s: float, show: Callable[[str, int, bool], None],
               clock: Callable[[], float] = time.monotonic) -> StepReport:
    """`show(label, percent, finished)` once a step has run a second, then at most every
    `every_s`, and at its end."""
    start = clock()
    last = [-math.inf]  # the first line comes at one second, whatever `every_s`

    def report(done: int, total: int) -> None:
        now = clock()
        finished = done >= total
        if now - start < 1.0 or (not finished and now - last[0] < every_s):
            return
        last[0] = now
        show(label, 100 * done // max(total, 1), finished)

    return report


def terminal(label: str, clock: Callable[[], float] = time.monotonic) -> StepReport:
    def show(label: str, percent: int, finished: bool) -> None:
        print(f"\r{label}: {percent}%", end="\n" if finished else "", file=sys.stderr, flush=True)

    return _throttled(label, 0.5, show, clock)


def service(label: str, clock: Callable[[], float] = time.monotonic) -> StepReport:
    def show(label: str, percent: int, finished: bool) -> None:
        notify(f"STATUS=building the model: {label} {percent}%")
        log.info("building the model", extra={"step": label, "percent": percent})

    return _throttled(label, 2.0, show, clock)
