"""Warm start: pay what the first requests after a start would otherwise pay, before the engine
says READY=1 (docs/reliability.md, "Bounded connections and warm start").

Measured on the default model (bench/warm_start.py): ONNX Runtime itself costs no more on the
first run of a decode batch shape than on the second, so there is no per-shape planning to turn
off; what the first burst paid was one-time work: the session's first runs (its thread pool and
memory arena being set up, the first prefill paying most), the chat template's compile and the
grammar engine's tokenizer view, the last of which ran on a thread of its own right when the
first requests came in. All of it is done here, on throwaway KV rows that are freed after.
On that machine the model runs cost as much the second time as the first (about 3 CPU seconds
for max_batch 8 and a 256-token chunk): `[engine] warm_shapes = false` skips them where start-up
time matters more. They stay on by default: on GPU execution providers a new shape can cost far
more (TensorRT builds an engine for a shape outside its profiles; not measured here)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .backends.base import Backend
from .prepare import RequestPreparer

log = logging.getLogger("edge_runtime.warm")


def warm_engine(backend: Backend, preparer: RequestPreparer, prefill_chunk: int, *, shapes: bool = True) -> float:
    """Build the request preparer's lazy parts and, with `shapes`, run every shape the scheduler
    will use at the smallest cache (a full prefill chunk, a one-token prefill, a decode of each
    batch size up to max_batch); returns the seconds taken. Call before the scheduler starts."""
    start = time.perf_counter()
    grammar = threading.Thread(target=preparer.grammars.warm, name="grammar-warmup", daemon=True)
    grammar.start()  # compiled code that drops the GIL: it overlaps the model runs
    _render(preparer)
    if shapes:
        _model_runs(backend, prefill_chunk)
    grammar.join()
    elapsed = time.perf_counter() - start
    log.info("warmed up", extra={"seconds": round(elapsed, 3), "shapes": shapes, "max_batch": backend.max_batch,
                                 "prefill_chunk": prefill_chunk})
    return elapsed


def _render(preparer: RequestPreparer) -> None:
    """The chat template is compiled and the tokenizer's caches filled on first use."""
    tokenizer = preparer.tokenizer
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True)
        tokenizer.encode(text, add_special_tokens=False)
    tokenizer.encode("Hello!", add_special_tokens=True)


def _model_runs(backend: Backend, prefill_chunk: int) -> None:
    # Room for the chunk and one decode per batch size in the first slot.
    chunk = max(1, min(prefill_chunk, backend.max_context - backend.max_batch - 1))
    slots = [backend.allocate() for _ in range(backend.max_batch)]
    try:
        backend.prefill(slots[0], np.zeros(chunk, np.int64))  # a long prompt's chunks
        for slot in slots[1:]:
            backend.prefill(slot, np.zeros(1, np.int64))  # a prompt's last, short chunk
        for n in range(1, len(slots) + 1):
            if backend.seq_len(slots[0]) < backend.max_context:
                backend.decode(slots[:n], [0] * n)
    finally:
        for slot in reversed(slots):
            backend.free(slot)
