"""Fault suite, bounded connections (issue 15): floods of idle connections and half-sent frames
on the engine's socket, slowloris HTTP connections and broken HTTP framing at the sidecar. The
real engine (tiny model) and sidecar, real sockets; each test asserts that the bounds close what
they should and that a real client is served meanwhile."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import struct
import tempfile
from pathlib import Path

import aiohttp
import msgpack
import pytest
from engine_harness import Engine
from proxy_harness import Proxy

from edge_runtime.client import EngineClient
from edge_wire.frames import encode_frame
from proxy.config import ProxyConfig

pytestmark = pytest.mark.chaos

FLOOD = 1000  # idle engine connections
SLOWLORIS = 200  # HTTP connections sending a head byte by byte
CLOSE_BOUND_S = 15.0  # how long the bounds may take to close a flood (they take about a timeout)
LONG = {"temperature": 0.0, "max_tokens": 240, "ignore_eos": True}  # over 12 s on a 50 ms-per-step engine
CHAT = {"model": "x", "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 4}
MARKER = "ECHOCHECK"  # in every bad request: it must come back in neither the answer nor the log


@pytest.fixture(autouse=True, scope="module")
def _enough_file_descriptors():
    """A flood holds both ends of its connections in this process: raise the soft limit (a
    shell's default may be 1024) as far as the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * FLOOD
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the fault suite needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="eb-", dir="/tmp") as d:
        yield Path(d)


def run(coro, timeout_s: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """What the peer sent until it closed the connection (raises TimeoutError past the bound)."""
    data = b""
    async with asyncio.timeout(CLOSE_BOUND_S):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except OSError:  # reset (an aborted Unix socket may say EINVAL)
            pass
    return data


async def idle_connection(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that asks for the status once, then stays idle. (Waiting for the answer
    paces the flood: connecting faster than the engine accepts overflows the listen backlog,
    where asyncio takes a refused Unix connect for an established one.)"""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(encode_frame({"op": "status"}))
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    assert msgpack.unpackb(await reader.readexactly(size))["type"] == "status"
    return reader, writer


class LongStream:
    """A long generate on its own connection, producing a token every step (50 ms or more)."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._token = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._consume())
        await self.next_token()

    async def next_token(self) -> None:
        """Wait for one more token: the stream is being served now."""
        self._token.clear()
        await self._token.wait()

    async def stop(self) -> None:
        assert self.task is not None and not self.task.done()  # still streaming: nothing cut it
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def _consume(self) -> None:
        async for _ in self.client.generate(prompt="the quick brown fox", params=LONG):
            self._token.set()


# ---------------------------------------------------------------------------------------------- engine


def test_engine_cap_closes_the_oldest_idle_connections_first(tiny_model_dir, sock_dir):
    with Engine(tiny_model_dir, sock_dir / "e.sock", delay_s=0.05, max_connections=50, idle_timeout_s=0) as engine:
        async def main():
            async with await EngineClient.connect(engine.socket_path) as busy:
                stream = LongStream(busy)
                await stream.start()  # in flight: never counted as idle
                flood = [await idle_connection(engine.socket_path) for _ in range(FLOOD)]
                # Each connection past the cap closed the longest idle one: all but the newest 49.
                await asyncio.gather(*(closed_by_peer(r) for r, _ in flood[: FLOOD - 49]))
                assert len(engine.server.connections) == 50
                await stream.next_token()
                await stream.stop()
                async with await EngineClient.connect(engine.socket_path) as late:
                    assert (await late.status())["type"] == "status"
                for _, w in flood:
                    w.close()

        run(main())


def test_engine_idle_connections_time_out_while_streams_run_on(tiny_model_dir, sock_dir):
    with Engine(tiny_model_dir, sock_dir / "e.sock", delay_s=0.05, max_connections=4 * FLOOD, idle_timeout_s=0.5) as engine:
        async def main():
            async with await EngineClient.connect(engine.socket_path) as busy:
                stream = LongStream(busy)
                await stream.start()
                flood = [await idle_connection(engine.socket_path) for _ in range(FLOOD)]
                await asyncio.gather(*(closed_by_peer(r) for r, _ in flood))
                # Streaming for longer than the idle timeout: the busy client is not idle.
                await stream.next_token()
                await stream.stop()
                assert (await busy.status())["type"] == "status"
                for _, w in flood:
                    w.close()

        run(main())


@pytest.mark.parametrize("partial", [b"\x00\x00", struct.pack(">I", 100) + b"\x81\xa2op"], ids=["in-prefix", "in-body"])
def test_engine_half_sent_frame_is_answered_and_closed(tiny_model_dir, sock_dir, partial):
    with Engine(tiny_model_dir, sock_dir / "e.sock", frame_timeout_s=0.5) as engine:
        async def main():
            reader, writer = await asyncio.open_unix_connection(str(engine.socket_path))
            writer.write(partial)
            async with await EngineClient.connect(engine.socket_path) as other:
                assert (await other.status())["type"] == "status"  # served while the frame hangs
                data = await closed_by_peer(reader)
                (size,) = struct.unpack(">I", data[:4])
                frame = msgpack.unpackb(data[4 : 4 + size])
                assert (frame["type"], frame["code"]) == ("error", "bad_frame")
                assert "not completed within 0.5 s" in frame["message"]
                assert (await other.status())["type"] == "status"
            writer.close()

        run(main())


# ---------------------------------------------------------------------------------------------- sidecar


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="eb-", dir="/tmp") as d, Engine(tiny_model_dir, Path(d) / "e.sock") as e:
        yield e


def _proxy(engine: Engine, **config) -> Proxy:
    # grace_s: a shutdown waits this long for handlers still running (the harness waits 30 s in all)
    return Proxy(ProxyConfig(engine_socket=str(engine.socket_path), model_aliases=("x",), grace_s=5, **config))


async def _slowloris(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.Task[None]]:
    """A connection that sends a request head a header line at a time, never ending it. (A first,
    whole request paces the flood: its answer says the sidecar has accepted the connection.)"""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    await reader.readuntil(b'{"status":"ok"}')
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n")

    async def trickle() -> None:
        try:
            while not reader.at_eof():
                await asyncio.sleep(0.2)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return reader, asyncio.create_task(trickle())


async def _served(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=CHAT) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["choices"][0]["message"]["content"] is not None


def test_sidecar_slowloris_heads_time_out_and_clients_are_served(engine):
    with _proxy(engine, header_timeout_s=0.5) as proxy:
        host, port = "127.0.0.1", int(proxy.url.rsplit(":", 1)[1])

        async def main():
            slow = [await _slowloris(host, port) for _ in range(SLOWLORIS)]
            await _served(proxy.url)  # while the flood trickles
            answers = await asyncio.gather(*(closed_by_peer(r) for r, _ in slow))
            assert all(a == b"" for a in answers)  # cut, not answered
            await asyncio.gather(*(t for _, t in slow))
            await _served(proxy.url)

        run(main())


def test_sidecar_cap_closes_the_oldest_idle_connections_first(engine):
    with _proxy(engine, max_connections=50, header_timeout_s=60) as proxy:
        host, port = "127.0.0.1", int(proxy.url.rsplit(":", 1)[1])

        async def main():
            slow = [await _slowloris(host, port) for _ in range(SLOWLORIS)]
            # Each connection past the cap closed the longest idle one: all but the newest 50.
            await asyncio.gather(*(closed_by_peer(r) for r, _ in slow[: SLOWLORIS - 50]))
            await _served(proxy.url)  # made room by closing the longest idle one
            for _, task in slow:
                task.cancel()
            await asyncio.gather(*(t for _, t in slow), return_exceptions=True)

        run(main())


def test_sidecar_idle_connections_and_stalled_bodies_are_bounded(engine):
    with _proxy(engine, idle_timeout_s=0.5, body_timeout_s=0.5) as proxy:
        host, port = "127.0.0.1", int(proxy.url.rsplit(":", 1)[1])

        async def main():
            idle = [await asyncio.open_connection(host, port) for _ in range(50)]  # never send a byte
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\": ")  # and the rest never comes
            answer = await closed_by_peer(reader)
            assert all(a == b"" for a in await asyncio.gather(*(closed_by_peer(r) for r, _ in idle)))
            await _served(proxy.url)
            writer.close()
            for _, w in idle:
                w.close()
            return answer

        head, _, body = run(main()).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b'"code": "request_timeout"' in body


BAD_FRAMING = {
    "content-length-and-chunked": f"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nX-{MARKER}: 1\r\n"
                                  "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "oversize-header": f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: {MARKER}{'a' * 10000}\r\n\r\n",
    "control-characters": f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Ctl: {MARKER}\x01\x7f\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
def test_sidecar_bad_framing_is_a_plain_400_logged_once_without_echo(engine, caplog, raw):
    with _proxy(engine) as proxy:
        host, port = "127.0.0.1", int(proxy.url.rsplit(":", 1)[1])
        caplog.set_level(logging.DEBUG)
        caplog.clear()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(raw.encode("latin-1"))
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.split(b" ")[1] == b"400", answer[:200]
        assert MARKER.encode() not in answer  # neither in the head nor in the plain-text body
        bad = [r for r in caplog.records if r.getMessage() == "bad HTTP request"]
        assert len(bad) == 1 and bad[0].levelno == logging.WARNING and bad[0].exc_info is None
        for record in caplog.records:
            assert MARKER not in str(vars(record)), record
            assert record.levelno < logging.ERROR, record.getMessage()
