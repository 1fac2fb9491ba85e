"""Prefix KV cache ("hot prompts"): KV state of prompt prefixes, in blocks of `block` tokens,
keyed by a hash chained over the tokens of the block and every block before it (so a key
names the whole prefix), shared by all requests and evicted least-recently-used under a byte
budget. Within that budget it holds only what live sequences leave of the engine's KV budget:
the scheduler lowers its limit (shrink_to) as their KV cache grows and raises it as they end."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


def block_keys(prompt_ids: list[int], block: int) -> list[bytes]:
    """Chained keys of the prompt's full blocks."""
    keys, prev = [], b""
    for i in range(len(prompt_ids) // block):
        digest = hashlib.blake2b(prev, digest_size=16)
        digest.update(np.asarray(prompt_ids[i * block : (i + 1) * block], dtype=np.int64).tobytes())
        prev = digest.digest()
        keys.append(prev)
    return keys


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int) -> None:
        self.budget_bytes = budget_bytes  # its own cap (prefix_cache_mb)
        self.limit_bytes = budget_bytes  # what it may hold now: the cap, or less while live sequences need the room
        self.block = block
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # status() reads from other threads
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self.evictions = 0

    def lookup(self, prompt_ids: list[int]) -> list[np.ndarray]:
        """KV blocks of the longest cached prefix, leaving at least the prompt's last token to
        be computed (its logits are needed)."""
        usable = (len(prompt_ids) - 1) // self.block
        found: list[np.ndarray] = []
        with self._lock:
            keys = block_keys(prompt_ids[: usable * self.block], self.block)
            for key in keys:
                kv = self._blocks.get(key)
                if kv is None:
                    break
                found.append(kv)
            # Mark deepest first, so parents stay more recent than children and a child is
            # never left unreachable by its parent's eviction before it goes itself.
            for key in reversed(keys[: len(found)]):
                self._blocks.move_to_end(key)
            if found:
                self.hits += 1
                self.tokens_saved += len(found) * self.block
            else:
                self.misses += 1
        return found

    def insert(self, prompt_ids: list[int], cached_blocks: int, export: Callable[[int, int], np.ndarray]) -> None:
        """Store the prompt's full blocks after the first `cached_blocks` (which came from the
        cache); export(start, end) gives the KV of those positions."""
        keys = block_keys(prompt_ids, self.block)
        with self._lock:
            missing = [i for i in range(cached_blocks, len(keys)) if keys[i] not in self._blocks]
        if not missing:
            return
        kv = export(missing[0] * self.block, (missing[-1] + 1) * self.block)
        with self._lock:
            for i in missing:
                offset = (i - missing[0]) * self.block
                block_kv = np.ascontiguousarray(kv[:, :, :, offset : offset + self.block])
                if block_kv.nbytes > self.limit_bytes:
                    break
                self._blocks[keys[i]] = block_kv
                self.bytes_used += block_kv.nbytes
            self._evict_to(self.limit_bytes)

    def shrink_to(self, limit_bytes: int) -> None:
        """Hold at most `limit_bytes` (never more than the cache's own budget) from now on,
        evicting least-recently-used blocks to get there; a higher limit lets it grow again."""
        with self._lock:
            self.limit_bytes = max(0, min(limit_bytes, self.budget_bytes))
            self._evict_to(self.limit_bytes)

    def _evict_to(self, limit_bytes: int) -> None:
        """Drop least-recently-used blocks until at most `limit_bytes` are held (lock held)."""
        while self.bytes_used > limit_bytes:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes_used -= evicted.nbytes
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "blocks": len(self._blocks), "block_tokens": self.block, "bytes_used": self.bytes_used,
                "budget_bytes": self.budget_bytes, "limit_bytes": self.limit_bytes, "hits": self.hits, "misses": self.misses,
                "tokens_saved": self.tokens_saved, "evictions": self.evictions,
            }
