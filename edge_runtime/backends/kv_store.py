"""The KV cache as device tensors that grow with use: per layer, one key and one value
OrtValue [rows, kv_heads, capacity, head_dim] on the session's device. `rows` covers the
slots in use (slots are handed out lowest first) and `capacity` the longest sequence held,
rounded up to a power of two; both grow when a step needs more and shrink when sequences
end, so memory follows the tokens held instead of max_batch x max_context. Steps bind these
tensors by device pointer (row ranges are pointer offsets, the rows being outermost), so the
cache never crosses to the host; only resizing and the prefix cache's copies touch it there."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..memory import release_free_heap

MIN_CAPACITY = 64  # positions: smaller buffers would be resized every few tokens


def ort_device(device: str) -> str:
    """The OrtValue device type a session on `device` ("cpu", "cuda", "tensorrt") keeps its
    tensors on: TensorRT's execution provider works on CUDA memory."""
    return "cpu" if device == "cpu" else "cuda"


def capacity_for(tokens: int, max_context: int) -> int:
    """Positions to hold `tokens`: the next power of two (at least MIN_CAPACITY), capped."""
    return min(max(MIN_CAPACITY, 1 << max(tokens - 1, 0).bit_length()), max_context)


class KVStore:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: type, max_context: int, device: str = "cpu") -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.max_context = max_context
        self.device = ort_device(device)
        self.rows = 0
        self.capacity = 0
        self._values: list[tuple[ort.OrtValue, ort.OrtValue]] = []
        self.generation = 0  # bumped on every resize: bindings made before are stale

    # -- sizes ---------------------------------------------------------------------------

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_allocated(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token()

    def bytes_if(self, rows: int, tokens: int) -> int:
        """What bytes_allocated() will be once reserve(rows, tokens) has run: it only grows."""
        return max(rows, self.rows) * max(capacity_for(tokens, self.max_context), self.capacity) * self.bytes_per_token()

    def row_bytes(self) -> int:
        """Bytes of one row of one layer's key (or value) tensor."""
        return self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize

    # -- growth --------------------------------------------------------------------------

    def reserve(self, rows: int, tokens: int) -> None:
        """Make room for `rows` rows of `tokens` positions, keeping what is held; grows only."""
        if rows <= self.rows and tokens <= self.capacity:
            return
        self.resize(max(rows, self.rows), max(capacity_for(tokens, self.max_context), self.capacity))

    def fit(self, rows: int, tokens: int) -> None:
        """Shrink to `rows` rows of `tokens` positions when that at least halves the memory
        (halving, not any saving, so a sequence ending does not copy the cache every time)."""
        capacity = capacity_for(tokens, self.max_context) if rows else 0
        if rows * capacity * 2 <= self.rows * self.capacity:
            self.resize(rows, capacity)

    def resize(self, rows: int, capacity: int) -> None:
        """New tensors of this shape holding the overlap of the old ones (layer by layer, so
        the old and new copies of only one layer are alive at once)."""
        if not rows or not capacity:
            self._values, rows, capacity = [], 0, 0
        else:
            keep_rows, keep_cap = min(rows, self.rows), min(capacity, self.capacity)

            def resized(old: ort.OrtValue | None) -> ort.OrtValue:
                new = np.zeros((rows, self.kv_heads, capacity, self.head_dim), self.dtype)
                if old is not None:
                    new[:keep_rows, :, :keep_cap] = self._host(old)[:keep_rows, :, :keep_cap]
                return self._to_device(new)

            if not self._values:
                self._values = [(None, None)] * self.layers
            for i, (k, v) in enumerate(self._values):
                self._values[i] = (resized(k), resized(v))
        self.rows, self.capacity = rows, capacity
        self.generation += 1
        release_free_heap()  # the old tensors' pages go back to the OS now, not at some later malloc

    # -- device access (for bindings) ------------------------------------------------------

    def pointers(self, layer: int) -> tuple[int, int]:
        """Device addresses of row 0 of the layer's key and value tensors."""
        k, v = self._values[layer]
        return k.data_ptr(), v.data_ptr()

    def shape(self, rows: int) -> list[int]:
        return [rows, self.kv_heads, self.capacity, self.head_dim]

    # -- host copies (prefix cache) ---------------------------------------------------------

    def export(self, row: int, start: int, end: int) -> np.ndarray:
        """A host copy of one row's positions [start, end): [layers, 2, kv_heads, n, head_dim]."""
        return np.stack([np.stack([self._host(k)[row, :, start:end], self._host(v)[row, :, start:end]])
                         for k, v in self._values])

    def write(self, row: int, start: int, kv: np.ndarray) -> None:
        """Store `kv` (as export returns it) at the row's positions from `start`; the caller
        has reserved room."""
        n = kv.shape[3]
        for (k, v), layer in zip(self._values, kv):
            for value, part in ((k, layer[0]), (v, layer[1])):
                host = self._host(value)
                host[row, :, start : start + n] = part
                if not self._shares_memory(value, host):  # a device copy: send it back
                    value.update_inplace(host)

    def _host(self, value: ort.OrtValue) -> np.ndarray:
        """The tensor as a numpy array: a view of the same memory on the CPU, a copy otherwise."""
        return value.numpy()

    @staticmethod
    def _shares_memory(value: ort.OrtValue, host: np.ndarray) -> bool:
        return host.ctypes.data == value.data_ptr()

    def _to_device(self, host: np.ndarray) -> ort.OrtValue:
        """An OrtValue on the store's device with host's contents. On the CPU it wraps the
        array itself: np.zeros pages are mapped lazily, so positions never written cost no RSS."""
        if self.device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(host)
        return ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)
