"""EngineClient: the asyncio client of the engine daemon's socket (docs/engine-protocol.md).
One connection carries many concurrent streams: a reader task hands each incoming frame to
the queue of the request whose id it carries."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edge_wire.frames import BUSY, DEFAULT_MAX_FRAME, FRAME_TOO_LARGE, ProtocolError, encode_frame, read_frame

from .config import check_socket_dir, default_socket_path

log = logging.getLogger("edge_runtime.client")

CONNECTION_LOST = "connection_lost"  # client-side code: the socket closed under a request
_MAX_INCOMING_FRAME = 16 << 20  # the engine's own frames are small; this only bounds a broken peer


class EngineError(Exception):
    """An error frame from the engine (or a lost connection), with the frame's fields."""

    def __init__(self, code: str, message: str, param: str | None = None, estimated_wait_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param
        self.estimated_wait_s = estimated_wait_s


class Busy(EngineError):
    """The engine's queue is full (estimated_wait_s says for about how long)."""


def _error(frame: dict[str, Any]) -> EngineError:
    cls = Busy if frame.get("code") == BUSY else EngineError
    return cls(str(frame.get("code")), str(frame.get("message")), frame.get("param"), frame.get("estimated_wait_s"))


class EngineClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame_bytes: int) -> None:
        self._reader = reader
        self._writer = writer
        self.max_frame_bytes = max_frame_bytes  # may be set to the engine's limit, which its status reports
        # id -> its frames; None marks a stream given up by its caller, awaiting its last frame.
        self._queues: dict[str, asyncio.Queue[dict[str, Any] | EngineError] | None] = {}
        self._ids = itertools.count(1)
        self._lost: EngineError | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | Path | None = None, *, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> EngineClient:
        """Connect to the engine at `path` (default: the engine's default socket path);
        `max_frame_bytes` should match the engine's limit, so oversize requests fail here."""
        path = Path(path or default_socket_path())
        check_socket_dir(path.parent, create=False)  # an OSError: callers treat it as the engine being unreachable
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer, max_frame_bytes)

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def generate(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        prompt_ids: list[int] | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        trace: dict[str, str] | None = None,
        tools: list[dict[str, Any]] | None = None,
        grammar: dict[str, Any] | None = None,
        id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the stream's token frames, then its done frame; an error frame raises EngineError
        (Busy when the engine's queue is full). Leaving the loop early cancels the request."""
        request_id = id or f"g{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"id {request_id!r} is in use on this connection")
        fields = {"prompt": prompt, "messages": messages, "prompt_ids": prompt_ids, "params": params,
                  "timeout_s": timeout_s, "trace": trace, "tools": tools, "grammar": grammar}
        frame = {"op": "generate", "id": request_id, **{k: v for k, v in fields.items() if v is not None}}
        queue: asyncio.Queue[dict[str, Any] | EngineError] = asyncio.Queue()
        self._queues[request_id] = queue
        ended = False
        try:
            await self._send(frame)
            while True:
                item = await queue.get()
                if isinstance(item, EngineError):
                    ended = True
                    raise item
                ended = item.get("type") == "done"
                yield item
                if ended:
                    return
        finally:
            if ended or self._lost is not None:
                self._queues.pop(request_id, None)
            else:  # given up early: keep the id reserved until the engine's last frame for it
                self._queues[request_id] = None
                try:
                    await self._send({"op": "cancel", "id": request_id})
                except EngineError:
                    pass  # connection gone: the engine cancels on disconnect anyway

    async def cancel(self, id: str) -> None:
        """Ask the engine to stop stream `id`; its stream then ends with finish_reason "cancelled"
        (or however it ended first)."""
        await self._send({"op": "cancel", "id": id})

    async def status(self) -> dict[str, Any]:
        """The engine's load and health: queue_depth, running, estimated_wait_s, tokens_per_s, ..."""
        return await self._ask("status")

    async def models(self) -> list[dict[str, Any]]:
        return (await self._ask("models"))["models"]

    @property
    def closed(self) -> bool:
        """True once the connection is gone: every later call raises EngineError."""
        return self._lost is not None

    async def wait_closed(self) -> None:
        """Return once the connection is gone (closed by either side); never raises."""
        await asyncio.wait([self._reader_task])

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        await asyncio.gather(self._reader_task, return_exceptions=True)

    async def abort(self) -> None:
        """Drop the connection at once, unsent data and all (an engine that stopped reading)."""
        self._writer.transport.abort()
        await asyncio.gather(self._reader_task, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------

    async def _ask(self, op: str) -> dict[str, Any]:
        # Apart from the ids callers give their streams (s1 would take a stream's frames).
        request_id = f"_{op}{next(self._ids)}"
        while request_id in self._queues:
            request_id = f"_{op}{next(self._ids)}"
        queue: asyncio.Queue[dict[str, Any] | EngineError] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            await self._send({"op": op, "id": request_id})
            answer = await queue.get()
        finally:
            self._queues.pop(request_id, None)
        if isinstance(answer, EngineError):
            raise answer
        return answer

    async def _send(self, frame: dict[str, Any]) -> None:
        if self._lost is not None:
            raise EngineError(self._lost.code, self._lost.message)
        data = encode_frame(frame)
        if len(data) - 4 > self.max_frame_bytes:
            raise EngineError(FRAME_TOO_LARGE, f"request of {len(data) - 4} bytes exceeds the limit of {self.max_frame_bytes} bytes")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise EngineError(CONNECTION_LOST, f"connection to the engine lost ({exc})") from None

    async def _read_loop(self) -> None:
        lost = EngineError(CONNECTION_LOST, "connection to the engine closed")
        try:
            while (frame := await read_frame(self._reader, _MAX_INCOMING_FRAME)) is not None:
                self._dispatch(frame)
        except ProtocolError as exc:
            lost = EngineError(exc.code, f"unreadable frame from the engine: {exc.message}")
        except (ConnectionError, OSError) as exc:
            lost = EngineError(CONNECTION_LOST, f"connection to the engine lost ({exc})")
        self._lost = lost
        for queue in self._queues.values():
            if queue is not None:
                queue.put_nowait(EngineError(lost.code, lost.message))
        self._writer.close()

    def _dispatch(self, frame: dict[str, Any]) -> None:
        request_id = frame.get("id")
        if request_id not in self._queues:
            # e.g. not_found for a cancel that crossed the stream's done frame, or a fatal bad_frame
            log.debug("frame for no waiting request: %s", frame)
            return
        queue = self._queues[request_id]
        terminal = frame.get("type") in ("done", "error")
        if queue is None:
            if terminal:
                del self._queues[request_id]
            return
        queue.put_nowait(_error(frame) if frame.get("type") == "error" else frame)
