"""Structured logs: one JSON object per line on stderr (journald and log shippers parse them),
with the `extra=` fields of each call (request_id, conn, ...) as top-level keys, and the
trace_id and span_id of the current span while tracing is on."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone

from . import tracing

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = tracing.current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        entry.update((key, value) for key, value in vars(record).items() if key not in _RECORD_ATTRS)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str = "info") -> None:
    """Route every logger to stderr as JSON lines at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class OncePer:
    """Warnings about a flood (connections refused, bad requests) as one line per `every_s`, with
    how many were left unsaid since the last one, instead of one line per event."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self.logger, self.every_s = logger, every_s
        self._last = float("-inf")
        self._suppressed = 0

    def warning(self, msg: str, *, extra: dict[str, object]) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        self.logger.warning(msg, extra={**extra, "suppressed_since_last": self._suppressed})
        self._last, self._suppressed = now, 0
