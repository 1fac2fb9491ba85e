"""The reply side of one offloaded request: chunks arrive numbered, possibly twice (QoS 1
redelivers) or out of order (across a reconnect); frames leave in order, each once. A cloud
that goes quiet (no worker took the request, or the answer stalls) ends it with OffloadFailed
instead of a hang. A worker that promised heartbeats (`heartbeat_s` in its `accepted` chunk) and
sends nothing for `peer_timeout_s` is taken for dead (`silent`) without waiting for the idle
timeout; a heartbeat naming a chunk that never arrived says that chunk was lost (`lost`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from .protocol import ACCEPTED, HEARTBEAT, TERMINAL

MAX_PENDING = 4096  # chunks held waiting for an earlier one; more means the stream is broken
_UNSET = object()


class OffloadFailed(Exception):
    """The cloud path failed for this request. `reason`: `timeout` (nobody took it, or the
    answer stalled), `lost` (the broker connection dropped, or chunks were lost), `unavailable`
    (it could not be sent), `broken` (the chunk stream made no sense), `worker_lost` (the worker
    serving it is gone: its presence was cleared), `silent` (its heartbeats stopped), `moved`
    (the gateway is leaving the broker)."""

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
        self.created_at = time.monotonic()
        self.heard_at = self.created_at  # the owner's last chunk or heartbeat (monotonic)
        self.heartbeat_s: float | None = None  # what the owner promised in its accepted chunk
        self._gap: int | None = None  # a chunk a heartbeat said was sent, still missing at that heartbeat

    def feed(self, seq: int, chunk: dict[str, Any]) -> None:
        """Take chunk number `seq` (the chunk map itself); release what is now in order. The
        worker whose chunk 0 (`accepted`) arrives first owns the answer: should a request reach
        two workers (two share groups, a redelivery after a worker's reconnect), or a forger
        answer, every chunk not naming the owner is dropped (counted in `strays`)."""
        if self._failed:
            return
        source = chunk.get("worker") if isinstance(chunk.get("worker"), str) else None
        if chunk.get("type") == HEARTBEAT:
            self._heartbeat(seq, source)
            return
        if self._source is _UNSET or source == self._source:
            self.heard_at = time.monotonic()
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

    @property
    def owner(self) -> str | None:
        """The worker whose chunk 0 arrived first (None: none yet, or one that does not say)."""
        return None if self._source is _UNSET else self._source

    def _heartbeat(self, last_seq: int, source: str | None) -> None:
        """The worker is alive and has sent chunks up to `last_seq`. When an earlier heartbeat
        already named a chunk that is still missing, it was lost (QoS 1 keeps one publisher's
        order on a topic, so a heartbeat never overtakes the chunk before it twice)."""
        if self._source is not _UNSET and source != self._source:
            self.strays += 1
            return
        self.heard_at = time.monotonic()
        if self._source is _UNSET or last_seq < self.next_seq:
            self._gap = None
            return
        if self._gap is not None and self._gap < self.next_seq:
            self._gap = None
        if self._gap is not None:
            self.fail(OffloadFailed("lost", f"chunk {self.next_seq} of the answer was lost"))
        else:
            self._gap = self.next_seq

    def fail(self, error: OffloadFailed) -> None:
        if not self.finished and not self._failed:
            self._failed = True
            self._out.put_nowait(error)

    async def frames(self, accept_timeout_s: float, idle_timeout_s: float,
                     peer_timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """The engine frames of the answer, in order: token frames, then the done or error
        frame (error frames are yielded too: the caller decides what they mean). Raises
        OffloadFailed on a timeout or a failure fed in. `peer_timeout_s`: the longest silence
        (not even a heartbeat) of a worker that promised heartbeats."""
        last_item = time.monotonic()
        while True:
            if self.accepted and self.heartbeat_s is not None and peer_timeout_s is not None:
                limit, silent = self.heard_at + peer_timeout_s, True
            else:
                limit, silent = last_item + (idle_timeout_s if self.accepted else accept_timeout_s), False
            try:
                async with asyncio.timeout(max(0.0, limit - time.monotonic())):
                    item = await self._out.get()
            except TimeoutError:
                if silent and self.heard_at + peer_timeout_s > time.monotonic():
                    continue  # a heartbeat came meanwhile
                self._failed = True
                if silent:
                    raise OffloadFailed("silent", f"the cloud worker {self.worker} sent nothing (not even a heartbeat) "
                                                  f"for {peer_timeout_s:g} s") from None
                timeout = idle_timeout_s if self.accepted else accept_timeout_s
                what = "the cloud worker stopped answering" if self.accepted else "no cloud worker took the request"
                raise OffloadFailed("timeout", f"{what} within {timeout:g} s") from None
            last_item = time.monotonic()
            if isinstance(item, OffloadFailed):
                raise item
            if item.get("type") == ACCEPTED:
                self.accepted = True
                self.worker = item.get("worker") if isinstance(item.get("worker"), str) else None
                beat = item.get("heartbeat_s")
                if isinstance(beat, (int, float)) and not isinstance(beat, bool) and beat > 0:
                    self.heartbeat_s = float(beat)
                continue
            self.accepted = True  # a worker answering without the accepted chunk still answers
            yield item
            if item.get("type") in TERMINAL:
                return
