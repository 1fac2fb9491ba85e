"""Hand freed heap back to the OS. Loading a tokenizer parses megabytes of JSON whose freed
memory glibc keeps; returning it before the model loads lowers the process's peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_heap() -> None:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "malloc_trim"):  # glibc only; elsewhere nothing to do
        libc.malloc_trim(0)
