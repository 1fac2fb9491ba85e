"""The reply side of one offloaded request: chunks arrive numbered, possibly twice (QoS 1
redelivers) or out of order (across a reconnect); frames leave in order, each once. A cloud
that goes quiet (no worker took the request, or the answer stalls) ends it with OffloadFailed
instead of a hang."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .protocol import ACCEPTED, TERMINAL

MAX_PENDING = 4096  # chunks held waiting for an earlier one; more means the stream is broken
_UNSET = object()


class OffloadFailed(Exception):
    """The cloud path failed for this request. `reason`: `timeout` (nobody took it, or the
    answer stalled), `lost` (the broker connection dropped), `unavailable` (it could not be
    sent), `broken` (the chunk stream made no sense)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ReplyAssembler:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_seq = 0
        self.duplicates = 0  # chunks seen before (dropped)
        self.reordered = 0  # chunks that arrived before an earlier one (held, then released in order)
        self.accepted = False
        self.worker: str | None = None
        self.finished = False  # the terminal frame has been released
        self.strays = 0  # chunks of another worker that answered the same request (dropped)
        self._source: Any = _UNSET  # the worker whose answer this is (None: one that does not say)
        self._early: dict[str | None, dict[int, dict[str, Any]]] = {}  # chunks before chunk 0, by worker
        self._pending: dict[int, dict[str, Any]] = {}
        self._out: asyncio.Queue[dict[str, Any] | OffloadFailed] = asyncio.Queue()
        self._failed = False

    def feed(self, seq: int, chunk: dict[str, Any]) -> None:
        """Take chunk number `seq` (the chunk map itself); release what is now in order. The
        worker whose chunk 0 (`accepted`) arrives first owns the answer: should a request reach
        two workers (two share groups, a redelivery after a worker's reconnect), or a forger
        answer, every chunk not naming the owner is dropped (counted in `strays`)."""
        if self._failed:
            return
        source = chunk.get("worker") if isinstance(chunk.get("worker"), str) else None
        if self._source is _UNSET:
            if seq != 0:  # whose answer this is is not known yet: hold it by worker
                held = self._early.setdefault(source, {})
                if seq in held:
                    self.duplicates += 1
                elif sum(len(h) for h in self._early.values()) >= MAX_PENDING:
                    self.fail(OffloadFailed("broken", f"more than {MAX_PENDING} chunks wait for chunk 0"))
                else:
                    held[seq] = chunk
                return
            self._source = source
            self._pending = self._early.pop(source, {})
            self.strays += sum(len(h) for h in self._early.values())
            self._early.clear()
        elif source != self._source:  # a chunk that does not name the owner is not the owner's
            self.strays += 1
            return
        if seq < self.next_seq or seq in self._pending:
            self.duplicates += 1
            return
        if self.finished:  # past the end: nothing more belongs to this answer
            return
        if seq > self.next_seq:
            self.reordered += 1
            if len(self._pending) >= MAX_PENDING:
                self.fail(OffloadFailed("broken", f"more than {MAX_PENDING} chunks wait for chunk {self.next_seq}"))
                return
        self._pending[seq] = chunk
        while self.next_seq in self._pending:
            item = self._pending.pop(self.next_seq)
            self.next_seq += 1
            self._out.put_nowait(item)
            if item.get("type") in TERMINAL:
                self.finished = True
                self._pending.clear()
                return

    def fail(self, error: OffloadFailed) -> None:
        if not self.finished and not self._failed:
            self._failed = True
            self._out.put_nowait(error)

    async def frames(self, accept_timeout_s: float, idle_timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """The engine frames of the answer, in order: token frames, then the done or error
        frame (error frames are yielded too: the caller decides what they mean). Raises
        OffloadFailed on a timeout or a failure fed in."""
        while True:
            timeout = idle_timeout_s if self.accepted else accept_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    item = await self._out.get()
            except TimeoutError:
                what = "the cloud worker stopped answering" if self.accepted else "no cloud worker took the request"
                self._failed = True
                raise OffloadFailed("timeout", f"{what} within {timeout:g} s") from None
            if isinstance(item, OffloadFailed):
                raise item
            if item.get("type") == ACCEPTED:
                self.accepted = True
                self.worker = item.get("worker") if isinstance(item.get("worker"), str) else None
                continue
            self.accepted = True  # a worker answering without the accepted chunk still answers
            yield item
            if item.get("type") in TERMINAL:
                return
