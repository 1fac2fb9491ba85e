"""Continuous batching: one engine thread owns the backend. Between decode steps it admits
queued requests into free KV slots (reusing cached prompt prefixes), runs at most one prefill
chunk for a newcomer, then one decode step for every running sequence in a single forward.
Sequences leave the batch the moment they finish, are cancelled or pass their deadline.

One KV budget covers the live sequences' KV cache and the prefix cache's blocks: a queued
request is admitted only when the live KV cache with it fits the budget (the first in line
waits; nothing overtakes it), and the prefix cache holds only what the live sequences leave.
A request is always admitted when nothing runs, and running sequences may grow past the
budget while they decode: they are never stopped for it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.base import Backend
from .errors import EdgeRuntimeError
from .generate import NO_TOKEN, GenerationChunk, SequenceStream, check_prompt, step_batch
from .grammar import Constraint
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .tools import ToolCallParser

log = logging.getLogger("edge_runtime.scheduler")
Sink = Callable[[GenerationChunk], None]


class Busy(EdgeRuntimeError):
    """The admission queue is full; the caller should go elsewhere or retry later."""

    def __init__(self, estimated_wait_s: float) -> None:
        super().__init__(f"engine busy: admission queue full, estimated wait {estimated_wait_s:.1f}s")
        self.estimated_wait_s = estimated_wait_s


class ShuttingDown(EdgeRuntimeError):
    def __init__(self) -> None:
        super().__init__("engine is shutting down")


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() value
    trace: dict | None = None  # W3C trace context, carried for tracing
    constraint: Constraint | None = None  # the grammar the output must follow
    tool_parser: ToolCallParser | None = None  # splits tool calls from content
    # Noted by the engine thread for the request's spans (edge_runtime/engine_spans.py):
    admitted_at: float | None = None  # time.monotonic() when it got a KV slot
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass
class _Sequence:
    request: Request
    sink: Sink
    stream: SequenceStream
    slot: int = -1
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # prompt not yet prefilled
    cached_blocks: int = 0
    next_token: int = NO_TOKEN
    admitted_at: float = 0.0


class _Throughput:
    """Tokens per second over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        now = time.monotonic()
        self._events.append((now, n))
        while self._events and self._events[0][0] < now - self._window:
            self._events.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._events if t >= now - self._window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        *,
        queue_size: int = 64,
        prefill_chunk: int = 256,
        prefix_cache_bytes: int = 0,
        prefix_block: int = 32,
        kv_budget_bytes: int = 1 << 30,  # kv_cache_mb's default
        model_info: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block) if prefix_cache_bytes > 0 else None
        self.kv_budget_bytes = kv_budget_bytes  # live KV plus the prefix cache's blocks
        self.model_info = model_info or {}
        self._queue: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # admitted: prefilling or decoding
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._throughput = _Throughput()
        self._avg_request_s = 1.0  # running average of time in a slot, for the wait estimate
        self.heartbeat = time.monotonic()  # last time the engine loop went round
        self.completed = 0

    # -- API (any thread) -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, sink: Sink) -> None:
        check_prompt(request.prompt_ids, self.backend.vocab_size, self.backend.max_context)
        stream = SequenceStream(self.tokenizer, request.prompt_ids, request.params, self.backend.vocab_size,
                                self.backend.max_context, request.constraint, request.tool_parser)
        with self._wake:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._queue) >= self.queue_size:
                raise Busy(self._estimated_wait())
            self._queue.append(_Sequence(request, sink, stream))
            self._wake.notify()

    def cancel(self, request_id: str) -> bool:
        with self._wake:
            known = any(s.request.id == request_id for s in (*self._queue, *self._running))
            if known:
                self._cancel.add(request_id)
                self._wake.notify()
            return known

    def warm_up(self, prompts_ids: list[list[int]]) -> None:
        """Prefill prompts (e.g. apps' system prompts) so their prefixes are cached; blocking."""
        for i, ids in enumerate(prompts_ids):
            done = threading.Event()
            request = Request(f"warmup-{i}", ids, SamplingParams(max_tokens=1, temperature=0.0))
            self.submit(request, lambda chunk: chunk.finish_reason and done.set())
            done.wait()

    def status(self) -> dict[str, Any]:
        with self._lock:
            queued, running = len(self._queue), len(self._running)
            used_tokens = sum(self.backend.seq_len(s.slot) for s in self._running if s.slot >= 0)
            wait = self._estimated_wait()
        per_token = self.backend.kv_bytes_per_token()
        prefix = self.prefix_cache.stats() if self.prefix_cache else None
        return {
            "queue_depth": queued,
            "queue_size": self.queue_size,
            "running": running,
            "max_batch": self.backend.max_batch,
            "estimated_wait_s": round(wait, 3),
            "tokens_per_s": round(self._throughput.rate(), 2),
            "completed": self.completed,
            "accepting": self._accepting,
            "heartbeat_age_s": round(time.monotonic() - self.heartbeat, 3),
            "kv": {
                "slots": self.backend.max_batch,
                "max_context": self.backend.max_context,
                "bytes_allocated": self.backend.kv_bytes_allocated(),
                "tokens_used": used_tokens,
                "bytes_used": used_tokens * per_token,
                "bytes_per_token": per_token,
                "prefix_bytes": prefix["bytes_used"] if prefix else 0,
                "budget_bytes": self.kv_budget_bytes,
            },
            "prefix_cache": prefix,
            "model": self.model_info,
        }

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting; let admitted and queued work finish for up to grace_s; cancel the rest."""
        with self._wake:
            self._accepting = False
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            with self._lock:
                if not self._queue and not self._running:
                    break
            time.sleep(0.02)
        with self._wake:
            self._cancel.update(s.request.id for s in (*self._queue, *self._running))
            self._stop = True
            self._wake.notify()
        if self._thread:
            self._thread.join()

    # -- engine thread ----------------------------------------------------------------

    def _estimated_wait(self) -> float:
        """Seconds a request submitted now would wait for a slot (lock held)."""
        free = self.backend.max_batch - len(self._running)
        ahead = len(self._queue) - free + 1
        return 0.0 if ahead <= 0 else ahead / self.backend.max_batch * self._avg_request_s

    def _loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            with self._wake:
                self._end_cancelled_and_late()
                if self._stop and not self._running and not self._queue:
                    return
                admitted = self._admit()
                self._yield_prefix_room()
                if not self._running:
                    self._wake.wait(timeout=0.5)
                    continue
            for seq in admitted:  # outside the lock: copying cached KV takes a few ms
                self._place(seq)
            self._step()

    def _end_cancelled_and_late(self) -> None:
        now = time.monotonic()
        for seq in [*self._queue, *self._running]:
            rid = seq.request.id
            if rid in self._cancel:
                self._finish(seq, "cancelled", "cancelled by the client")
            elif seq.request.deadline is not None and now > seq.request.deadline:
                self._finish(seq, "deadline", "deadline passed before the request finished")
        self._cancel.clear()

    def _admit(self) -> list[_Sequence]:
        """Move queued requests into the batch, in order, while slots are free and the live KV
        cache with each fits the budget; anything fits when nothing runs (lock held)."""
        admitted = []
        while self._queue and len(self._running) < self.backend.max_batch:
            newcomer = (self.backend.next_slot(), len(self._queue[0].request.prompt_ids) + 1)
            if self._running and self._kv_need(newcomer) > self.kv_budget_bytes:
                break  # it waits for running sequences to end
            seq = self._queue.popleft()
            seq.slot = self.backend.allocate()
            seq.admitted_at = seq.request.admitted_at = time.monotonic()
            seq.stream.dequeued()
            seq.pending = np.asarray(seq.request.prompt_ids, dtype=np.int64)
            self._running.append(seq)
            admitted.append(seq)
        return admitted

    def _kv_need(self, newcomer: tuple[int, int] | None = None) -> int:
        """Bytes the live KV cache needs once every running sequence (and a newcomer: its slot
        and tokens) has its prompt in and room for its next token (lock held)."""
        held = [(s.slot, self.backend.seq_len(s.slot) + s.pending.size + 1) for s in self._running]
        if newcomer:
            held.append(newcomer)
        if not held:
            return self.backend.kv_bytes_allocated()
        return self.backend.kv_bytes_if(max(slot for slot, _ in held) + 1, max(tokens for _, tokens in held))

    def _yield_prefix_room(self) -> None:
        """Limit the prefix cache to what the live sequences leave of the budget before the
        step that may grow their KV cache, evicting its oldest blocks (lock held)."""
        if self.prefix_cache:
            self.prefix_cache.shrink_to(self.kv_budget_bytes - self._kv_need())

    def _place(self, seq: _Sequence) -> None:
        """Start a newly admitted sequence from the longest cached prefix of its prompt."""
        if not self.prefix_cache:
            return
        blocks = self.prefix_cache.lookup(seq.request.prompt_ids)
        if blocks:
            self.backend.import_kv(seq.slot, np.concatenate(blocks, axis=3))
            seq.cached_blocks = len(blocks)
            seq.request.cached_tokens = len(blocks) * self.prefix_cache.block
            seq.pending = seq.pending[len(blocks) * self.prefix_cache.block :]

    def _step(self) -> None:
        """One prefill chunk (for the oldest newcomer), then one decode step for the batch."""
        prefilling = next((s for s in self._running if s.pending.size), None)
        try:
            if prefilling is not None:
                self._prefill_chunk(prefilling)
            decoding = [s for s in self._running if not s.pending.size and s.next_token != NO_TOKEN]
            if decoding:
                logits = self.backend.decode([s.slot for s in decoding], [s.next_token for s in decoding])
                self._throughput.add(len(decoding))
                for seq, chunk in zip(decoding, step_batch([s.stream for s in decoding], logits)):
                    self._emit(seq, chunk)
        except Exception as exc:  # a backend failure ends the sequences it touched, not the engine
            log.exception("engine step failed")
            with self._lock:
                for seq in list(self._running):
                    self._finish(seq, "error", f"engine error: {exc}")

    def _prefill_chunk(self, seq: _Sequence) -> None:
        chunk, seq.pending = seq.pending[: self.prefill_chunk], seq.pending[self.prefill_chunk :]
        logits = self.backend.prefill(seq.slot, chunk)
        if seq.pending.size:
            return
        first = seq.stream.step(logits)
        if first.finish_reason:  # the slot is freed on emit: cache its prefix first
            self._cache_prefix(seq)
            self._emit(seq, first)
        else:  # the first token goes out before the copy, keeping it off the time to first token
            self._emit(seq, first)
            self._cache_prefix(seq)

    def _cache_prefix(self, seq: _Sequence) -> None:
        if self.prefix_cache:
            self.prefix_cache.insert(seq.request.prompt_ids, seq.cached_blocks, lambda a, b: self.backend.export_kv(seq.slot, a, b))

    def _emit(self, seq: _Sequence, chunk: GenerationChunk) -> None:
        if chunk.finish_reason:
            with self._lock:
                self._release(seq)
        else:
            seq.next_token = chunk.token_id
        self._deliver(seq, chunk)

    def _finish(self, seq: _Sequence, reason: str, message: str) -> None:
        """End a sequence that did not finish by itself (lock held)."""
        self._release(seq)
        chunk = seq.stream.final(NO_TOKEN, message if reason == "error" else "", None, reason)
        self._deliver(seq, chunk)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._queue:
            self._queue.remove(seq)
            seq.stream.dequeued()
            return
        if seq in self._running:
            self._running.remove(seq)
            self.backend.free(seq.slot)
            self.completed += 1
            spent = time.monotonic() - seq.admitted_at
            self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * spent

    def _deliver(self, seq: _Sequence, chunk: GenerationChunk) -> None:
        try:
            seq.sink(chunk)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("sink of request %s failed", seq.request.id)
