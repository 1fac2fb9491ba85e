"""The interface every backend implements: a pool of KV-cache slots, prefill into a slot,
decode one step for a batch of slots, free a slot. A slot costs memory only for the tokens
it holds."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    max_batch: int  # number of KV slots (sequences held at once)
    max_context: int  # tokens per slot (prompt + generated)
    vocab_size: int

    def allocate(self) -> int:
        """Reserve an empty KV slot and return its id; raises RuntimeError when none is free."""

    def next_slot(self) -> int:
        """The slot allocate() would hand out now; raises RuntimeError when none is free."""

    def free(self, slot: int) -> None:
        """Release a slot and its KV state."""

    def seq_len(self, slot: int) -> int:
        """Tokens currently held in the slot's KV cache."""

    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        """Append token_ids (1-D int) to the slot's KV cache; return float32 logits [vocab]
        of the last position."""

    def decode(self, slots: list[int], token_ids: list[int]) -> np.ndarray:
        """One decode step: token_ids[i] is appended to slots[i]. One forward for the whole
        batch. Returns float32 logits [len(slots), vocab]."""

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV state one token takes (all layers, keys and values)."""

    def kv_bytes_allocated(self) -> int:
        """Bytes the KV cache holds now (it grows with the tokens held and shrinks as
        sequences end)."""

    def kv_bytes_if(self, rows: int, tokens: int) -> int:
        """Bytes the KV cache will hold once it has room for slots [0, rows) of `tokens`
        positions each (it grows to what the longest sequence needs; it never shrinks for this)."""

    def export_kv(self, slot: int, start: int, end: int) -> np.ndarray:
        """A copy of the slot's KV state for positions [start, end):
        [layers, 2, kv_heads, end - start, head_dim]."""

    def import_kv(self, slot: int, kv: np.ndarray) -> None:
        """Append KV state (as export_kv returns it) to the slot, as if those tokens had been
        prefilled."""
