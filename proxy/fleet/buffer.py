"""The telemetry buffer: an on-disk FIFO of encoded messages (sqlite3, in the state directory)
that outlives broker outages and restarts of the gateway. It is bounded in bytes: past the
bound the oldest messages are dropped, and the drops are counted (persistently) so that the
controller learns of the gap."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class TelemetryBuffer:
    def __init__(self, path: Path, max_bytes: int) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(str(path), isolation_level=None)  # autocommit; explicit transactions below
        # WAL + NORMAL: a commit is not an fsync (flash wear), yet a killed process loses nothing.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()
        self._count, self._bytes = count, size
        row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        self.dropped = row[0] if row else 0

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def append(self, payload: bytes) -> None:
        """Keep `payload` at the end; drop from the front while over max_bytes (never the new one)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO messages (payload) VALUES (?)", (payload,))
            self._count += 1
            self._bytes += len(payload)
            dropped = 0
            while self._bytes > self.max_bytes and self._count > 1:
                row_id, size = self._db.execute("SELECT id, LENGTH(payload) FROM messages ORDER BY id LIMIT 1").fetchone()
                self._db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                self._count -= 1
                self._bytes -= size
                dropped += 1
            if dropped:
                self.dropped += dropped
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped', ?)", (self.dropped,))

    def peek(self, limit: int, after_id: int = 0) -> list[tuple[int, bytes]]:
        """Up to `limit` of the oldest messages with ids above `after_id`, oldest first."""
        return self._db.execute("SELECT id, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def remove_through(self, last_id: int) -> None:
        """Forget every message up to and including `last_id` (delivered)."""
        with self._db:
            self._db.execute("BEGIN")
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages WHERE id <= ?", (last_id,)).fetchone()
            self._db.execute("DELETE FROM messages WHERE id <= ?", (last_id,))
            self._count -= count
            self._bytes -= size

    def close(self) -> None:
        self._db.close()
