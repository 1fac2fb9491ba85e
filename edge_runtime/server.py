"""The engine daemon (`edge-runtime serve`): an asyncio Unix-socket server speaking the frame
protocol of edge_runtime/protocol.py in front of the scheduler's engine thread.

Threads: the event loop owns the sockets; the scheduler's engine thread owns the model. The
engine hands each chunk to a sink that only schedules a callback on the loop, so a slow
client can never stall the engine: its frames pile up in a bounded per-connection queue, and
a connection that overflows it is cut off (its requests cancelled).

Connections are bounded too (docs/reliability.md): one with nothing in flight that sends no frame
for idle_timeout_s is closed, a frame begun must be complete within frame_timeout_s, and past
max_connections the longest idle connection makes room for the new one (a new one is refused
when none is idle)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import signal
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from edge_wire.frames import (
    BAD_FRAME,
    BUSY,
    CONTEXT_LENGTH_EXCEEDED,
    DUPLICATE_ID,
    INTERNAL,
    INVALID_REQUEST,
    NOT_FOUND,
    SHUTTING_DOWN,
    VERSION,
    ProtocolError,
    encode_frame,
    error_frame,
    read_frame,
)
from edge_wire.messages import CancelOp, GenerateOp, ModelsOp, StatusOp, frame_id, parse_op
from edge_wire.settings import ConfigError

from . import engine_spans, tracing
from .config import EngineConfig, check_socket_dir
from .errors import ContextLengthExceeded, EdgeRuntimeError, InvalidRequest
from .generate import GenerationChunk
from .grammar import Constraint
from .logs import OncePer, setup_logging
from .prepare import RequestPreparer
from .protocol import Generation, done_frame, generation, token_frame
from .scheduler import Busy, Request, Scheduler, ShuttingDown
from .sd_notify import notify, watchdog_interval_s
from .tokenizer import Tokenizer
from .tools import ToolCallParser, tool_format
from .warm import warm_engine

log = logging.getLogger("edge_runtime.server")

OUTBOUND_LIMIT = 4096  # frames queued for one client before it counts as stuck
CLOSE_FLUSH_S = 5.0  # how long a closing connection may take to flush its last frames
LIMIT_LOG_EVERY_S = 60.0  # connection-limit warnings: at most one line this often
_MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path, less the terminating NUL


class EngineServer:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        model_info: dict[str, Any],
        socket_path: Path,
        *,
        max_frame_bytes: int,
        grace_s: float,
        outbound_limit: int = OUTBOUND_LIMIT,
        max_connections: int = 128,
        idle_timeout_s: float = 600.0,
        frame_timeout_s: float = 10.0,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.socket_path = Path(socket_path)
        self.max_frame_bytes = max_frame_bytes
        self.grace_s = grace_s
        self.outbound_limit = outbound_limit
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s  # 0: never
        self.frame_timeout_s = frame_timeout_s
        self.shutting_down = False
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._conn_numbers = itertools.count(1)
        self._request_numbers = itertools.count(1)  # makes engine request ids unique across connections
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._limit_log = OncePer(log, LIMIT_LOG_EVERY_S)  # a flood of connections is one line, not thousands

    async def start(self) -> None:
        """Listen on the socket (mode 0660), replacing a stale socket file but never a live server."""
        prepare_socket_path(self.socket_path)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window where others may connect
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.socket_path))
        except OSError as exc:
            raise EdgeRuntimeError(f"{self.socket_path}: cannot listen ({exc.strerror or exc})") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o660)

    @functools.cached_property
    def preparer(self) -> RequestPreparer:
        """Turns generate requests into prompt ids and grammar constraints (made on first use)."""
        return RequestPreparer(self.tokenizer, self.scheduler.backend.vocab_size)

    def streams_in_flight(self) -> int:
        return sum(len(conn.streams) for conn in self.connections)

    def next_request_id(self, conn: str, client_id: str) -> str:
        return f"{conn}-{next(self._request_numbers)}-{client_id}"

    def status_frame(self) -> dict[str, Any]:
        return {
            "type": "status",
            "version": VERSION,
            **self.scheduler.status(),
            "connections": len(self.connections),
            "streams": self.streams_in_flight(),
            "shutting_down": self.shutting_down,
            "max_frame_bytes": self.max_frame_bytes,
        }

    def models_frame(self) -> dict[str, Any]:
        return {"type": "models", "version": VERSION, "models": [self.model_info]}

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: the first drains and exits; a second cancels what is still running."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown())
            return
        log.warning("second stop signal: cancelling all streams")
        for conn in list(self.connections):
            conn.cancel_streams()

    async def shutdown(self) -> None:
        """Refuse new generate requests, let running streams finish within grace_s (the rest are
        cancelled), deliver their last frames, close every connection and the socket."""
        if self.shutting_down:
            await self._stopped.wait()
            return
        self.shutting_down = True
        streams = self.streams_in_flight()
        notify("STOPPING=1", f"STATUS=draining {streams} streams (grace {self.grace_s:g} s)")
        log.info("shutting down", extra={"streams": streams, "grace_s": self.grace_s})
        # Blocks until every request got its final chunk; their callbacks are queued before ours.
        await asyncio.to_thread(self.scheduler.shutdown, self.grace_s)
        await asyncio.gather(*(conn.settle() for conn in list(self.connections)))
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(conn.close() for conn in list(self.connections)))
        if self._server is not None:
            await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)
        log.info("stopped")
        self._stopped.set()

    def _make_room(self) -> bool:
        """Close the connection idle the longest (none in flight, none mid-frame); False if none is."""
        idle = [c for c in self.connections if c.idle()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: (c.last_active, c.number))
        self._limit_log.warning("connection limit reached; closing the longest idle connection",
                                extra={"conn": oldest.name, "max_connections": self.max_connections})
        oldest.drop()
        return True

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def watchdog(self, interval_s: float) -> None:
        """Ping systemd's watchdog only while the engine thread goes round: it does so at least
        every half second when idle, and after every step when busy. A stuck step (or a dead
        thread) stops the pings, and systemd restarts the service."""
        while True:
            await asyncio.sleep(interval_s)
            status = self.scheduler.status()
            age = status.get("heartbeat_age_s", 0.0)
            if age <= max(interval_s, 1.0):
                notify("WATCHDOG=1", f"STATUS=serving: {status.get('running', 0)} running, {status.get('queue_depth', 0)} queued")
            else:
                log.error("engine thread made no progress; withholding watchdog ping", extra={"heartbeat_age_s": age})

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer, next(self._conn_numbers))
        held = sum(1 for c in self.connections if not c.closing)  # one closed a moment ago is still listed
        if held >= self.max_connections and not self._make_room():
            self._limit_log.warning("connection limit reached; refusing a new connection",
                                    extra={"conn": conn.name, "max_connections": self.max_connections})
            writer.write(encode_frame(error_frame(None, BUSY, f"the engine holds its limit of {self.max_connections} connections")))
            writer.close()
            return
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)


@dataclass
class _Stream:
    id: str  # the client's id, unique among this connection's streams in flight
    request_id: str  # the scheduler's id, unique in the process
    submitted: bool = False
    cancelled: bool = False
    timeline: engine_spans.Timeline | None = None  # only while tracing is on


class _Connection:
    """One client: reads and validates frames, runs its generate streams, writes their frames."""

    def __init__(self, server: EngineServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.number = number  # in order of arrival
        self.name = f"c{number}"
        self.streams: dict[str, _Stream] = {}
        self._loop = asyncio.get_running_loop()
        self._outbound: deque[bytes] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False  # flush what is queued, then close
        self._dead = False  # the socket is gone: drop everything
        self._writer_task: asyncio.Task[None] | None = None
        self._submitting: set[asyncio.Task[None]] = set()
        self.last_active = self._loop.time()  # the last frame read or stream ended
        self.mid_frame = False  # some bytes of a frame are in, not all of it yet

    def idle(self) -> bool:
        """Nothing in flight: no stream running or being prepared, no frame half read."""
        return not self.streams and not self._submitting and not self.mid_frame and not self._closing

    @property
    def closing(self) -> bool:
        return self._closing

    def drop(self) -> None:
        """Close the connection now (its streams, if any, are cancelled)."""
        self._kill()

    async def run(self) -> None:
        log.debug("connected", extra={"conn": self.name})
        self._writer_task = asyncio.create_task(self._write_loop())
        try:
            await self._read_loop()
        finally:
            if self.streams:
                log.info("client went away; cancelling its streams", extra={"conn": self.name, "streams": len(self.streams)})
            await self.close()
            log.debug("disconnected", extra={"conn": self.name})

    async def settle(self) -> None:
        """Wait for the generate requests still being tokenized to be submitted or answered."""
        await asyncio.gather(*self._submitting, return_exceptions=True)

    async def close(self) -> None:
        """Cancel what is still running, flush the queued frames (briefly), close the socket."""
        self._abandon_streams()
        self._closing = True
        self._wakeup.set()
        if self._writer_task is not None and self._writer_task is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(self._writer_task), CLOSE_FLUSH_S)
            except asyncio.TimeoutError:
                self._kill()
        self.writer.close()

    def cancel_streams(self) -> None:
        """Cancel every request in flight; each still ends with its final frame."""
        for stream in list(self.streams.values()):
            self._cancel(stream)

    def _abandon_streams(self) -> None:
        """The client is gone or cut off: cancel its requests and forget them (nothing can reach it)."""
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            self._cancel(stream)

    # -- reading ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while not self._closing:
            try:
                first = await self._first_byte()
                if first is None:
                    log.debug("idle connection closed", extra={"conn": self.name, "idle_timeout_s": self.server.idle_timeout_s})
                    return
                if not first:
                    return  # the client closed between frames
                frame = await self._read_frame(first)
            except ProtocolError as exc:
                log.warning("bad frame", extra={"conn": self.name, "code": exc.code, "error": exc.message})
                self.send(exc.frame(None))
                if exc.fatal:
                    return  # framing lost: nothing after this can be trusted
                continue
            except (ConnectionError, OSError):
                return
            self.last_active = self._loop.time()
            self._dispatch(frame)
            # Buffered frames are read without suspending: yield so that the writer (and other
            # clients) get their turn against a client that pipelines thousands of requests.
            await asyncio.sleep(0)

    async def _first_byte(self) -> bytes | None:
        """A frame's first byte (b"" at the end of the stream), or None when the connection stayed
        idle for idle_timeout_s. While streams run it waits for as long as they do: the client
        is waiting for output, not idle."""
        idle_s = self.server.idle_timeout_s
        while True:
            if not idle_s:
                wait_s = None
            elif self.idle():
                wait_s = self.last_active + idle_s - self._loop.time()
                if wait_s <= 0:
                    return None
            else:
                wait_s = idle_s  # look again then: the streams may have ended meanwhile
            try:
                async with asyncio.timeout(wait_s):
                    return await self.reader.read(1)  # a cancelled read consumes nothing
            except TimeoutError:
                continue

    async def _read_frame(self, first: bytes) -> dict[str, Any]:
        """The rest of the frame `first` began, within frame_timeout_s."""
        self.mid_frame = True
        try:
            async with asyncio.timeout(self.server.frame_timeout_s):
                frame = await read_frame(self.reader, self.server.max_frame_bytes, first)
        except TimeoutError:
            raise ProtocolError(BAD_FRAME, f"frame not completed within {self.server.frame_timeout_s:g} s") from None
        finally:
            self.mid_frame = False
        assert frame is not None  # a frame begun is a frame, or a ProtocolError
        return frame

    def _dispatch(self, frame: dict[str, Any]) -> None:
        try:
            op = parse_op(frame)
            if isinstance(op, GenerateOp):
                self._start_generate(generation(op))
            elif isinstance(op, CancelOp):
                self._cancel_op(op)
            elif isinstance(op, StatusOp):
                self.send(_with_id(self.server.status_frame(), op.id))
            elif isinstance(op, ModelsOp):
                self.send(_with_id(self.server.models_frame(), op.id))
        except ProtocolError as exc:
            log.info("request refused", extra={"conn": self.name, "request_id": frame_id(frame), "code": exc.code, "error": exc.message})
            self.send(exc.frame(frame_id(frame)))
        except Exception:  # a bug must cost this request, never the server
            log.exception("request failed", extra={"conn": self.name, "request_id": frame_id(frame)})
            self.send(error_frame(frame_id(frame), INTERNAL, "internal error"))

    def _start_generate(self, gen: Generation) -> None:
        op = gen.op
        if self.server.shutting_down:
            raise ProtocolError(SHUTTING_DOWN, "engine is shutting down; not accepting requests")
        if op.id in self.streams:
            raise ProtocolError(DUPLICATE_ID, f"id {op.id!r} is already in flight on this connection", "id")
        stream = _Stream(op.id, self.server.next_request_id(self.name, op.id))
        if tracing.enabled():
            stream.timeline = engine_spans.Timeline(_trace(op))
        self.streams[op.id] = stream
        deadline = None if op.timeout_s is None else time.monotonic() + op.timeout_s
        task = asyncio.create_task(self._submit(stream, gen, deadline))
        self._submitting.add(task)
        task.add_done_callback(self._submitting.discard)

    async def _submit(self, stream: _Stream, gen: Generation, deadline: float | None) -> None:
        op = gen.op
        prompt_field = "messages" if op.messages is not None else "prompt_ids" if op.prompt_ids is not None else "prompt"
        try:
            # Off the loop: rendering, tokenizing and compiling a grammar take a while.
            prompt_ids, constraint, parser = await asyncio.to_thread(self._prepare, gen)
            if stream.cancelled:
                self._end(stream, done_frame(stream.id, "cancelled", None, None))
                return
            if self.server.shutting_down:
                raise ShuttingDown()
            request = Request(stream.request_id, prompt_ids, op.params, deadline, _trace(op), constraint=constraint,
                              tool_parser=parser)
            if stream.timeline is not None:
                stream.timeline.submit(request)
            self.server.scheduler.submit(request, self._sink(stream))
            stream.submitted = True
            log.debug(
                "submitted",
                extra={"conn": self.name, "request_id": stream.request_id, "prompt_tokens": len(prompt_ids),
                       "traceparent": op.trace.traceparent if op.trace else None},
            )
        except Busy as exc:
            self._end(stream, error_frame(stream.id, BUSY, str(exc), None, exc.estimated_wait_s))
        except ShuttingDown:
            self._end(stream, error_frame(stream.id, SHUTTING_DOWN, "engine is shutting down; not accepting requests"))
        except ContextLengthExceeded as exc:
            self._end(stream, error_frame(stream.id, CONTEXT_LENGTH_EXCEEDED, str(exc), prompt_field))
        except InvalidRequest as exc:
            param = prompt_field if exc.param in ("prompt", "messages") else exc.param
            self._end(stream, error_frame(stream.id, INVALID_REQUEST, str(exc), param))
        except Exception:
            log.exception("generate failed", extra={"conn": self.name, "request_id": stream.request_id})
            self._end(stream, error_frame(stream.id, INTERNAL, "internal error"))

    def _prepare(self, gen: Generation) -> tuple[list[int], Constraint | None, ToolCallParser | None]:
        preparer = self.server.preparer
        return (preparer.prompt_ids(gen), *preparer.constraint(gen))

    def _cancel_op(self, op: CancelOp) -> None:
        stream = self.streams.get(op.id)
        if stream is None:
            raise ProtocolError(NOT_FOUND, f"no request {op.id!r} in flight on this connection", "id")
        self._cancel(stream)

    def _cancel(self, stream: _Stream) -> None:
        stream.cancelled = True  # if not yet submitted, _submit sees this and never submits
        if stream.submitted:
            self.server.scheduler.cancel(stream.request_id)

    # -- engine side ------------------------------------------------------------------

    def _sink(self, stream: _Stream) -> Callable[[GenerationChunk], None]:
        loop = self._loop

        def sink(chunk: GenerationChunk) -> None:  # runs on the engine thread: must not block
            try:
                loop.call_soon_threadsafe(self._on_chunk, stream, chunk)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to tell

        return sink

    def _on_chunk(self, stream: _Stream, chunk: GenerationChunk) -> None:
        if self.streams.get(stream.id) is not stream:
            return  # cancelled by a disconnect: the client is gone
        if chunk.finish_reason is None:
            self.send(token_frame(stream.id, chunk.text, chunk.token_id, chunk.logprob, chunk.tool_calls))
            return
        if chunk.finish_reason == "error":
            log.error("request failed in the engine", extra={"conn": self.name, "request_id": stream.request_id, "error": chunk.text})
            self._end(stream, error_frame(stream.id, INTERNAL, chunk.text or "engine error"))
            return
        if chunk.text or chunk.tool_calls:
            self.send(token_frame(stream.id, chunk.text, chunk.token_id, chunk.logprob, chunk.tool_calls))
        self._end(stream, done_frame(stream.id, chunk.finish_reason, chunk.usage, chunk.timings))
        log.info(
            "request finished",
            extra={"conn": self.name, "request_id": stream.request_id, "finish_reason": chunk.finish_reason,
                   "completion_tokens": chunk.usage.completion_tokens if chunk.usage else 0},
        )

    def _end(self, stream: _Stream, frame: dict[str, Any]) -> None:
        """Send a stream's terminal frame; its id is free again."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self.last_active = self._loop.time()
            self.send(frame)
            if stream.timeline is not None:
                engine_spans.record(stream.timeline, stream.id, frame)

    # -- writing ----------------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        if self._dead:
            return
        if len(self._outbound) >= self.server.outbound_limit:
            log.warning("client is not reading; dropping it", extra={"conn": self.name, "queued": len(self._outbound)})
            self._kill()
            return
        self._outbound.append(encode_frame(frame))
        self._wakeup.set()

    def _kill(self) -> None:
        """Drop the connection now: cancel its streams, discard its frames, reset the socket."""
        self._dead = self._closing = True
        self._abandon_streams()
        self._outbound.clear()
        self._wakeup.set()
        self.writer.transport.abort()

    async def _write_loop(self) -> None:
        try:
            while True:
                if self._outbound:
                    data = b"".join(self._outbound)
                    self._outbound.clear()
                    self.writer.write(data)
                    await self.writer.drain()
                    continue
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        except (ConnectionError, OSError):
            self._kill()  # the peer is gone; stop the engine working for it


def _with_id(frame: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    return frame if request_id is None else {"id": request_id, **frame}


def prepare_socket_path(path: Path) -> None:
    """Make the socket's directory; remove a stale socket file; refuse a live server's socket or
    any file that is not a socket."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise EdgeRuntimeError(f"{path}: socket path longer than {_MAX_SOCKET_PATH} bytes")
    check_socket_dir(path.parent, create=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeRuntimeError(f"{path.parent}: cannot create the socket directory ({exc.strerror or exc})") from None
        return
    if not stat.S_ISSOCK(mode):
        raise EdgeRuntimeError(f"{path}: exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left behind by a server that died
            return
        except OSError as exc:
            raise EdgeRuntimeError(f"{path}: cannot tell whether another engine is serving here ({exc})") from None
    raise EdgeRuntimeError(f"{path}: another engine is already serving on this socket")


# ---------------------------------------------------------------------------------------------- the daemon


def serve(config: EngineConfig) -> int:
    """Load the model, start the engine thread, serve until SIGTERM/SIGINT; returns the exit status."""
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .backends.providers import plan_device
    from .builder import progress
    from .models import resolve_model

    setup_logging(config.log_level)
    socket_path = config.resolved_socket_path()
    prepare_socket_path(socket_path)  # fail before the slow part if another engine is live
    notify("STATUS=loading model")
    model_dir = resolve_model(config.model, progress=progress.service, kv_dtype=config.kv_dtype)  # the first start builds it: shown
    tokenizer = Tokenizer.from_dir(model_dir)  # first: see OnnxRuntimeBackend
    device = plan_device(config, model_dir)
    backend = OnnxRuntimeBackend(model_dir, max_batch=config.max_batch, max_context=config.max_context, threads=config.threads, device=device)
    info = model_info(config.model, model_dir, backend, tokenizer)
    log.info("model loaded", extra={"model": info["id"], "dir": str(model_dir), "max_batch": backend.max_batch})
    notify("STATUS=warming up")
    preparer = RequestPreparer(tokenizer, backend.vocab_size)
    warm_engine(backend, preparer, config.prefill_chunk, shapes=config.warm_shapes)  # before the scheduler owns the backend
    kv_budget_bytes, prefix_cache_bytes = kv_budgets(config, backend)
    scheduler = Scheduler(
        backend, tokenizer, queue_size=config.queue_size, prefill_chunk=config.prefill_chunk,
        prefix_cache_bytes=prefix_cache_bytes, prefix_block=config.prefix_block, kv_budget_bytes=kv_budget_bytes, model_info=info,
    )
    scheduler.start()
    if config.warmup_prompts and config.prefix_cache_mb > 0:
        notify("STATUS=warming up the prefix cache")
        prompts_ids = warmup_ids(tokenizer, config.warmup_prompts)
        try:
            scheduler.warm_up(prompts_ids)
        except EdgeRuntimeError as exc:
            raise ConfigError(f"warmup_prompts: {exc}") from None
    elif config.warmup_prompts:
        log.warning("warmup_prompts ignored: the prefix cache is off (prefix_cache_mb = 0)")
    server = EngineServer(
        scheduler, tokenizer, info, socket_path, max_frame_bytes=config.max_frame_bytes, grace_s=config.grace_s,
        max_connections=config.max_connections, idle_timeout_s=config.idle_timeout_s, frame_timeout_s=config.frame_timeout_s,
    )
    server.preparer = preparer  # the warmed one (a cached_property: this sets its value)
    asyncio.run(_serve_until_stopped(server))
    return 0


def kv_budgets(config: EngineConfig, backend: Any) -> tuple[int, int]:
    """The KV budget and the prefix cache's cap, in bytes. Refuses a budget that cannot hold one
    sequence of max_context tokens (it could never run); caps the prefix cache at the budget."""
    budget = int(config.kv_cache_mb * 2**20)
    one_sequence = backend.kv_bytes_if(1, backend.max_context)
    if budget < one_sequence:
        least = math.ceil(one_sequence / 2**20 * 100) / 100
        raise ConfigError(f"kv_cache_mb = {config.kv_cache_mb:g} cannot hold one sequence of max_context = {backend.max_context} "
                          f"tokens ({backend.kv_bytes_per_token()} bytes each): set it to at least {least:g} MB")
    prefix = int(config.prefix_cache_mb * 2**20)
    if prefix > budget:
        log.warning("prefix_cache_mb = %g is more than kv_cache_mb = %g: the prefix cache gets at most kv_cache_mb",
                    config.prefix_cache_mb, config.kv_cache_mb)
    return budget, min(prefix, budget)


async def _serve_until_stopped(server: EngineServer) -> None:
    loop = asyncio.get_running_loop()
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    # `edge-runtime up` reads the model's id from this line: "serving ID on PATH"
    notify("READY=1", f"STATUS=serving {server.model_info['id']} on {server.socket_path}")
    log.info("serving", extra={"socket": str(server.socket_path)})
    interval = watchdog_interval_s()
    watchdog = asyncio.create_task(server.watchdog(interval)) if interval else None
    await server.wait_stopped()
    if watchdog is not None:
        watchdog.cancel()


def model_info(name: str | None, model_dir: Path, backend: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    """What `models` and `status` say about the loaded model."""
    from .models import DEFAULT_MODEL

    manifest = getattr(backend, "manifest", {})
    given = Path(name) if name else None
    model_id = DEFAULT_MODEL if given is None else given.stem if given.is_file() else given.name
    return {
        "id": model_id,
        "arch": manifest.get("spec", {}).get("arch"),
        "quantization": manifest.get("quantization"),
        "kv_dtype": manifest.get("kv_dtype", "fp32"),
        "max_context": backend.max_context,
        "vocab_size": backend.vocab_size,
        "chat_template": tokenizer.chat_template is not None,
        "tools": _tools_info(tokenizer),
        "source_sha256": manifest.get("source_sha256"),
    }


def _tools_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """How tools are written for this model: the tool format, and whether its chat template renders them."""
    fmt = tool_format(tokenizer.chat_template)
    return {"format": fmt.name, "template": fmt.native}


def warmup_ids(tokenizer: Tokenizer, prompts: tuple[str | dict[str, str], ...]) -> list[list[int]]:
    """Token ids of the configured warm-up prefixes: raw text as is, {system = ...} through the
    chat template (without a generation prompt, so it is a prefix of real conversations)."""
    out = []
    for i, prompt in enumerate(prompts):
        try:
            if isinstance(prompt, str):
                out.append(tokenizer.encode(prompt, add_special_tokens=True))
            else:
                text = tokenizer.apply_chat_template([{"role": "system", "content": prompt["system"]}], add_generation_prompt=False)
                out.append(tokenizer.encode(text, add_special_tokens=False))
        except EdgeRuntimeError as exc:
            raise ConfigError(f"warmup_prompts[{i}]: {exc}") from None
    return out


def _trace(op: GenerateOp) -> dict[str, str] | None:
    """The caller's trace context as the span helpers take it."""
    return msgspec.to_builtins(op.trace) if op.trace is not None else None
