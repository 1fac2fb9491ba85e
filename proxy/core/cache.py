"""Exact-match cache of complete responses to deterministic requests (temperature 0 or a fixed
seed): LRU under an entry count and a byte budget, entries expiring after a TTL. It holds the
generation's result, not a rendered body, so one entry answers streaming and plain requests."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

_ENTRY_OVERHEAD = 400  # bytes of bookkeeping per entry (key, tuple, dicts), roughly
_LOGPROB_BYTES = 120  # per token entry


@dataclass(frozen=True, slots=True)
class CachedResult:
    text: str
    finish_reason: str
    usage: dict[str, int]
    logprobs: tuple[tuple[str, float], ...] | None  # (token text, logprob) when they were asked for

    def size(self) -> int:
        return _ENTRY_OVERHEAD + sys.getsizeof(self.text) + _LOGPROB_BYTES * len(self.logprobs or ())


def cache_key(model: str, kind: str, fields: dict[str, Any], scope: str | None = None) -> bytes:
    """A digest of the canonical JSON of what decides the output: model, endpoint, prompt and
    the generation parameters (never stream options, user or metadata), and whose entry it is
    (`scope`: the caller; None for a cache shared by all)."""
    canonical = json.dumps([model, kind, fields, scope], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


class ResponseCache:
    """`shared`: one caller's entries answer another's requests (a hit, seen in `x-served-by`,
    would tell a caller what another sent); else each caller has its own entries."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float, *, shared: bool = False) -> None:
        self.shared = shared
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[float, int, CachedResult]] = OrderedDict()  # key -> (expiry, size, result)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[2]

    def put(self, key: bytes, result: CachedResult) -> None:
        size = result.size()
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + self.ttl_s, size, result)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))  # least recently used first

    def resize(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        """New bounds, applied at once (least recently used entries go first); entries already
        held keep the expiry they were given."""
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key)[1]
