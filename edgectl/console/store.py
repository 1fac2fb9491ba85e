"""The console's history in SQLite: chart points per gateway, the desired documents seen (the
push history, whoever issued them) and the gateways' reports on them.

Bounded twice: by age (rows older than `max_age_s` go) and by size (while the pages in use
exceed `max_bytes`, the oldest points go; freed pages are handed back to the file system).
Points are written in batches (one transaction a flush) from a bounded in-memory queue, so 200
gateways reporting every second cost one small transaction a second."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from typing import Any

MAX_PENDING = 20_000  # points waiting for the next flush; the oldest are dropped beyond (a stuck disk)
PRUNE_BATCH = 5_000  # points deleted per statement when over the size bound
_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (gateway TEXT NOT NULL, ts REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS points_by_gateway ON points (gateway, ts);
CREATE TABLE IF NOT EXISTS pushes (target TEXT NOT NULL, version INTEGER NOT NULL, seen REAL NOT NULL, issued_at REAL,
    issued_by TEXT, signed INTEGER NOT NULL, reset INTEGER NOT NULL, config TEXT NOT NULL, PRIMARY KEY (target, version));
CREATE TABLE IF NOT EXISTS reports (gateway TEXT NOT NULL, target TEXT NOT NULL, version INTEGER NOT NULL, ts REAL NOT NULL,
    status TEXT NOT NULL, reasons TEXT NOT NULL, results TEXT NOT NULL, PRIMARY KEY (gateway, target, version));
"""


class HistoryStore:
    def __init__(self, path: str | None, *, max_age_s: float, max_bytes: int) -> None:
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.path = path
        self.db = sqlite3.connect(path or ":memory:", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new file: freed pages can be returned
        if path:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")  # history, not a ledger: a crash may lose the last second
        self.db.executescript(_SCHEMA)
        self._pending: deque[tuple[str, float, str]] = deque(maxlen=MAX_PENDING)

    def close(self) -> None:
        self.flush()
        self.db.close()

    # -- points ------------------------------------------------------------------------------

    def add_point(self, gateway: str, ts: float, data: dict[str, Any]) -> None:
        self._pending.append((gateway, ts, json.dumps(data, separators=(",", ":"))))

    def flush(self) -> int:
        rows = list(self._pending)
        self._pending.clear()
        if rows:
            with self.db:  # one transaction for the batch
                self.db.execute("BEGIN")
                self.db.executemany("INSERT INTO points VALUES (?, ?, ?)", rows)
        return len(rows)

    def series(self, gateway: str, since: float, until: float | None = None, max_points: int = 600) -> list[dict[str, Any]]:
        """Points of `gateway` with since < ts <= until, oldest first, each {"ts", figures...};
        more than `max_points` are merged into time buckets (means; sums for counts)."""
        until = time.time() + 3600 if until is None else until
        rows = self.db.execute("SELECT ts, data FROM points WHERE gateway = ? AND ts > ? AND ts <= ? ORDER BY ts",
                               (gateway, since, until)).fetchall()
        points = [{"ts": ts, **json.loads(data)} for ts, data in rows]
        return points if len(points) <= max_points else _buckets(points, max_points)

    # -- pushes and reports ------------------------------------------------------------------

    def record_push(self, doc: dict[str, Any]) -> None:
        """A desired document seen on the broker (first sighting kept: who issued it, when)."""
        self.db.execute("INSERT OR IGNORE INTO pushes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
            doc["target"], doc["version"], time.time(), doc.get("issued_at"), doc.get("issued_by"),
            int("signature" in doc), int(bool(doc.get("reset"))), json.dumps(doc.get("config", {}), separators=(",", ":"))))

    def record_report(self, gateway: str, report: dict[str, Any]) -> None:
        if not isinstance(report.get("target"), str) or not isinstance(report.get("version"), int):
            return  # a report on an unreadable document: nothing to tie it to
        self.db.execute("INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, ?, ?, ?)", (
            gateway, report["target"], report["version"], report.get("ts") or time.time(), str(report.get("status")),
            json.dumps(report.get("reasons") or {}), json.dumps(report.get("results") or {})))

    def pushes(self, targets: list[str], gateway: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest documents pushed to `targets`, newest first, with `gateway`'s report on each."""
        if not targets:
            return []
        marks = ",".join("?" * len(targets))
        rows = self.db.execute(
            f"SELECT p.target, p.version, p.seen, p.issued_at, p.issued_by, p.signed, p.reset, p.config, r.status, r.reasons, "
            f"r.results, r.ts FROM pushes p LEFT JOIN reports r ON r.gateway = ? AND r.target = p.target AND r.version = p.version "
            f"WHERE p.target IN ({marks}) ORDER BY COALESCE(p.issued_at, p.seen) DESC LIMIT ?", (gateway or "", *targets, limit)).fetchall()
        return [{"target": t, "version": v, "seen": seen, "issued_at": at, "issued_by": by, "signed": bool(signed), "reset": bool(reset),
                 "config": json.loads(config),
                 "report": None if status is None else {"status": status, "reasons": json.loads(reasons), "results": json.loads(results),
                                                        "ts": rts}}
                for t, v, seen, at, by, signed, reset, config, status, reasons, results, rts in rows]

    # -- bounds ------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0] - self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * self.db.execute("PRAGMA page_size").fetchone()[0]

    def prune(self, now: float | None = None) -> int:
        """Drop what is past the age bound, then the oldest points while over the size bound;
        returns the points dropped."""
        cutoff = (time.time() if now is None else now) - self.max_age_s
        dropped = self.db.execute("DELETE FROM points WHERE ts < ?", (cutoff,)).rowcount
        self.db.execute("DELETE FROM pushes WHERE COALESCE(issued_at, seen) < ?", (cutoff,))
        self.db.execute("DELETE FROM reports WHERE ts < ?", (cutoff,))
        while (used := self.used_bytes()) > self.max_bytes:
            rows = self.db.execute("SELECT count(*) FROM points").fetchone()[0]
            excess = min(PRUNE_BATCH, int(rows * (used - self.max_bytes) / used) + 1)  # about the share over the bound
            gone = self.db.execute("DELETE FROM points WHERE rowid IN (SELECT rowid FROM points ORDER BY rowid LIMIT ?)",
                                   (excess,)).rowcount
            if not gone:
                break
            dropped += gone
        self.db.executescript("PRAGMA incremental_vacuum;")  # (execute() would free one page: the pragma works as it is stepped)
        if self.path:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file shrinks when the log is written back
        return dropped


def _buckets(points: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    start, end = points[0]["ts"], points[-1]["ts"]
    width = (end - start) / count or 1.0
    groups: dict[int, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(min(int((p["ts"] - start) / width), count - 1), []).append(p)
    return [_merge(group) for _, group in sorted(groups.items())]


_SUMMED = frozenset({"requests", "errors"})


def _merge(group: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": group[-1]["ts"]}
    keys = {k for p in group for k in p} - {"ts"}
    for key in keys:
        values = [p[key] for p in group if key in p]
        if key == "offload":
            merged: dict[str, float] = {}
            for by_reason in values:
                for reason, n in by_reason.items():
                    merged[reason] = merged.get(reason, 0) + n
            out[key] = merged
        elif not all(isinstance(v, (int, float)) for v in values):
            out[key] = values[-1]  # not a figure: the latest stands
        elif key in _SUMMED:
            out[key] = sum(values)
        else:
            out[key] = round(sum(values) / len(values), 2)
    return out
