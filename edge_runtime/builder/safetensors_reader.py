"""A small safetensors reader that memory-maps tensors as numpy and understands bf16 (which
the `safetensors` numpy loader does not), checking every offset against the file size so a
truncated file gives a clear error instead of a crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 on read
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as exc:
                raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} ends past the end of the file"
                )
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            self._entries[name] = (info["dtype"], info["shape"], begin, end)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (weights) or its own integer dtype."""
        dtype, shape, begin, end = self._entries[name]
        raw = self._map[self._data_start + begin : self._data_start + end]
        arr = raw.view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if arr.dtype.kind == "f":
            return arr.astype(np.float32)
        return arr
