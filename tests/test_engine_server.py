"""The engine daemon end to end: a real tiny ONNX model behind the real scheduler and server,
on a real Unix socket, driven by the async client and by raw sockets sending garbage. The
SIGTERM/systemd test runs `edge-runtime serve` as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import pytest
from engine_harness import Engine

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.builder.build import BuildOptions, build
from edge_runtime.client import Busy, EngineClient, EngineError
from edge_runtime.generate import generate
from edge_runtime.sampling import SamplingParams
from edge_runtime.server import EngineServer
from edge_wire.frames import encode_frame

GREEDY = {"temperature": 0.0, "max_tokens": 24}
LONG = {"temperature": 0.0, "max_tokens": 200, "ignore_eos": True}  # runs ~1 s on the slow engine
DRAINED = 3  # streams in flight when the subprocess gets SIGTERM


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints, tmp_path_factory) -> Path:
    return build(tiny_checkpoints["llama"][0], tmp_path_factory.mktemp("engine-model") / "tiny", BuildOptions(), quiet=True)


@pytest.fixture
def sock_dir():
    # Short paths: a Unix socket path must fit in 107 bytes, pytest's tmp paths may not.
    with tempfile.TemporaryDirectory(prefix="er-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def engine(model_dir):
    with tempfile.TemporaryDirectory(prefix="er-", dir="/tmp") as d, Engine(model_dir, Path(d) / "e.sock") as e:
        yield e


@pytest.fixture
def slow_engine(model_dir, sock_dir):
    """One slot, one queue place, 5 ms per forward."""
    with Engine(model_dir, sock_dir / "slow.sock", max_batch=1, queue_size=1, delay_s=0.005) as e:
        yield e


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _collect(client: EngineClient, **kw) -> list[dict]:
    return [frame async for frame in client.generate(**kw)]


def _text(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


async def _wait_status(client: EngineClient, what: str, predicate) -> dict:
    """The engine's status once `predicate` holds for it (asked again until it does)."""
    for _ in range(300):
        status = await client.status()
        if predicate(status):
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine never got {what}: {status}")


async def _wait_idle(client: EngineClient) -> dict:
    return await _wait_status(client, "idle", lambda s: s["running"] == 0 and s["queue_depth"] == 0)


class RawConn:
    """A blocking socket speaking (or abusing) the frame protocol."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self._buf = b""

    def send(self, obj) -> None:
        self.sock.sendall(encode_frame(obj) if isinstance(obj, dict) else obj)

    def _read(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self) -> dict | None:
        """The next frame, or None once the server has closed the connection."""
        header = self._read(4)
        if header is None:
            return None
        return msgpack.unpackb(self._read(struct.unpack(">I", header)[0]))

    def recv_until_done(self, request_id: str) -> list[dict]:
        frames = []
        while (frame := self.recv()) is not None:
            frames.append(frame)
            # duplicate_id answers the refused frame, not the stream in flight under that id
            if frame.get("id") == request_id and frame["type"] in ("done", "error") and frame.get("code") != "duplicate_id":
                return frames
        raise AssertionError(f"connection closed before {request_id} ended: {frames}")

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------- streaming


def test_generate_streams_tokens_then_done_equal_to_direct_generation(engine, model_dir):
    backend = OnnxRuntimeBackend(model_dir, max_batch=1)
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "the quick brown fox"}]
    chat_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    cases = [
        ({"prompt": "hello world"}, tok.encode("hello world", add_special_tokens=True)),
        ({"messages": messages}, chat_ids),
        ({"prompt_ids": [5, 6, 7, 8]}, [5, 6, 7, 8]),
    ]

    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            return [await _collect(client, params={**GREEDY, "logprobs": True}, **kw) for kw, _ in cases]

    for frames, (_, ids) in zip(run(main()), cases):
        chunks = list(generate(backend, tok, ids, SamplingParams(**GREEDY)))
        *tokens, done = frames
        assert done["type"] == "done" and done["finish_reason"] == chunks[-1].finish_reason
        assert done["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(chunks), "total_tokens": len(ids) + len(chunks)}
        assert set(done["timings"]) == {"ttft_s", "total_s", "decode_tokens_per_s", "queue_s"}
        assert 0 <= done["timings"]["queue_s"] <= done["timings"]["ttft_s"] <= done["timings"]["total_s"]
        assert all(f["type"] == "token" and isinstance(f["logprob"], float) for f in tokens)
        assert _text(frames) == "".join(c.text for c in chunks)
        assert [f["token_id"] for f in tokens] == [c.token_id for c in chunks][: len(tokens)]


def test_many_concurrent_clients_and_streams(engine):
    prompts = ["hello", "edge runtimes", "the lazy dog", "world", "quick brown"]

    async def one_client(i: int):
        async with await EngineClient.connect(engine.socket_path) as client:
            # Three streams at once on one connection, multiplexed by id.
            return await asyncio.gather(*(
                _collect(client, prompt=prompts[(i + j) % len(prompts)], params={**GREEDY, "max_tokens": 12 + j})
                for j in range(3)
            ))

    async def main():
        results = await asyncio.gather(*(one_client(i) for i in range(6)))
        async with await EngineClient.connect(engine.socket_path) as client:
            return results, await _wait_idle(client)

    results, status = run(main())
    for per_client in results:
        for j, frames in enumerate(per_client):
            done = frames[-1]
            assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
            assert done["usage"]["completion_tokens"] <= 12 + j
            assert len({f["id"] for f in frames}) == 1
    assert status["streams"] == 0


def test_status_and_models(engine):
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            return await client.status(), await client.models()

    status, models = run(main())
    assert status["version"] == 1 and status["max_batch"] == 2 and status["shutting_down"] is False
    assert {"queue_depth", "running", "estimated_wait_s", "tokens_per_s"} <= set(status)
    assert models[0]["max_context"] == 256 and models[0]["chat_template"] is True

    conn = RawConn(engine.socket_path)
    conn.send({"op": "models", "id": "m-1"})
    assert conn.recv()["id"] == "m-1"
    conn.close()


# ---------------------------------------------------------------------------------------------- cancellation, limits


def test_cancel_ends_stream_and_frees_slot(slow_engine):
    async def main():
        async with await EngineClient.connect(slow_engine.socket_path) as client:
            frames = []
            async for frame in client.generate(prompt="hello", params=LONG, id="long"):
                frames.append(frame)
                if len(frames) == 3:
                    await client.cancel("long")
            status = await _wait_idle(client)
            after = await _collect(client, prompt="hello", params=GREEDY)
            # Leaving the loop early cancels too.
            async for _ in client.generate(prompt="hello", params=LONG):
                break
            return frames, status, after, await _wait_idle(client)

    frames, status, after, status2 = run(main())
    assert frames[-1]["finish_reason"] == "cancelled" and frames[-1]["usage"]["completion_tokens"] < 200
    assert status["running"] == 0 and status["kv"]["tokens_used"] == 0
    assert after[-1]["type"] == "done"
    assert status2["running"] == 0


def test_client_disconnect_cancels_its_streams(slow_engine):
    cancelled = []
    real_cancel = slow_engine.scheduler.cancel
    slow_engine.scheduler.cancel = lambda rid: cancelled.append(rid) or real_cancel(rid)

    conn = RawConn(slow_engine.socket_path)
    conn.send({"op": "generate", "id": "a", "prompt": "hello", "params": LONG})
    assert conn.recv()["type"] == "token"
    conn.close()

    async def main():
        async with await EngineClient.connect(slow_engine.socket_path) as client:
            return await _wait_idle(client)

    status = run(main())
    assert len(cancelled) == 1 and status["running"] == 0 and status["completed"] == 1


def test_busy_when_queue_full(slow_engine):
    async def main():
        async with await EngineClient.connect(slow_engine.socket_path) as client:
            running = client.generate(prompt="hello", params=LONG)
            assert (await running.__anext__())["type"] == "token"  # admitted: the queue is empty again
            queued = asyncio.create_task(_collect(client, prompt="world", params=GREEDY))
            await _wait_status(client, "a queued request", lambda s: s["queue_depth"] == 1)
            with pytest.raises(Busy) as info:
                await _collect(client, prompt="fox", params=GREEDY)
            await running.aclose()
            return info.value, await queued

    busy, queued = run(main())
    assert busy.code == "busy" and busy.estimated_wait_s >= 0
    assert queued[-1]["type"] == "done"


def test_deadline(slow_engine):
    async def main():
        async with await EngineClient.connect(slow_engine.socket_path) as client:
            return await _collect(client, prompt="hello", params=LONG, timeout_s=0.1)

    frames = run(main())
    assert frames[-1]["finish_reason"] == "deadline"


def test_slow_reader_is_cut_off_without_stalling_the_engine(model_dir, sock_dir):
    with Engine(model_dir, sock_dir / "e.sock", max_batch=1, delay_s=0.002, outbound_limit=32) as engine:
        flood = RawConn(engine.socket_path)
        flood.send({"op": "generate", "id": "g", "prompt": "hello", "params": LONG})
        # Thousands of answers nobody reads: the socket buffer fills, then the outbound queue.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # cut off while still sending
            flood.send(b"".join(encode_frame({"op": "status", "id": f"s{i}"}) for i in range(20000)))

        async def main():
            async with await EngineClient.connect(engine.socket_path) as client:
                for _ in range(200):
                    if (await client.status())["connections"] == 1:
                        break
                    await asyncio.sleep(0.05)
                return await _wait_idle(client), await _collect(client, prompt="hi", params=GREEDY)

        status, frames = run(main())
        assert status["connections"] == 1 and status["completed"] == 1  # the flooder's stream was cancelled
        assert frames[-1]["type"] == "done"
        flood.close()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "garbage, code",
    [
        (struct.pack(">I", 5) + b"\xc1" * 5, "bad_frame"),
        (os.urandom(3) + b"\x00" + os.urandom(2000), None),  # whatever it parses as, it must not hurt
        (struct.pack(">I", 0xFFFFFFF0), "frame_too_large"),
        (struct.pack(">I", (1 << 20) + 1) + b"\x00" * 64, "frame_too_large"),
    ],
)
def test_garbage_that_breaks_framing_gets_an_error_and_close(engine, garbage, code):
    conn = RawConn(engine.socket_path)
    conn.send(garbage)
    conn.sock.shutdown(socket.SHUT_WR)
    frames = []
    while (frame := conn.recv()) is not None:
        frames.append(frame)
    conn.close()
    if code is not None:
        assert frames == [{"type": "error", "code": code, "message": frames[0]["message"]}]
    _assert_still_serving(engine)


def test_bad_requests_get_errors_and_the_connection_stays_open(engine):
    conn = RawConn(engine.socket_path)
    too_long = list(range(1, 300))  # the tiny model's context is 256
    cases = [
        (struct.pack(">I", 3) + msgpack.packb([1, 2]), "bad_frame", None),
        ({"op": "dance", "id": "u"}, "unknown_op", "op"),
        ({"op": "generate", "id": "t", "prompt": 42}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "p", "prompt": "hi", "params": {"temperature": -1}}, "invalid_request", "params.temperature"),
        ({"op": "generate", "id": "v", "prompt_ids": [10**6]}, "invalid_request", "prompt_ids"),
        ({"op": "generate", "id": "c", "prompt_ids": too_long}, "context_length_exceeded", "prompt_ids"),
        ({"op": "generate", "id": "c2", "prompt": "hello " * 400}, "context_length_exceeded", "prompt"),
        ({"op": "cancel", "id": "nobody"}, "not_found", "id"),
    ]
    for frame, code, param in cases:
        conn.send(frame)
        answer = conn.recv()
        assert answer["type"] == "error" and answer["code"] == code and answer.get("param") == param, answer
        if isinstance(frame, dict):
            assert answer["id"] == frame["id"]
    # A duplicate id while the first is in flight is refused; the first goes on.
    conn.send({"op": "generate", "id": "d", "prompt": "hello", "params": {**GREEDY, "max_tokens": 50, "ignore_eos": True}})
    conn.send({"op": "generate", "id": "d", "prompt": "hello"})
    frames = conn.recv_until_done("d")
    assert [f["code"] for f in frames if f["type"] == "error"] == ["duplicate_id"]
    assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 50
    conn.send({"op": "status", "id": "s"})
    assert conn.recv()["type"] == "status"
    conn.close()
    _assert_still_serving(engine)


def test_truncated_frame_and_abrupt_close(engine):
    conn = RawConn(engine.socket_path)
    conn.send(struct.pack(">I", 100) + b"\x81\xa2op")
    conn.close()
    _assert_still_serving(engine)


def _assert_still_serving(engine: Engine) -> None:
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            return await _collect(client, prompt="hello", params=GREEDY)

    assert run(main())[-1]["type"] == "done"


def test_status_asked_during_a_stream_with_a_like_id_does_not_take_its_frames(engine):
    """A caller may call its stream "s1" (the client once named its status asks so, and the ask took
    the stream's frames or the stream was refused)."""
    async def main():
        async with await EngineClient.connect(engine.socket_path) as client:
            stream = asyncio.create_task(_collect(client, prompt="hello", params=GREEDY, id="s1"))
            statuses = [await client.status() for _ in range(3)]
            return await stream, statuses

    frames, statuses = run(main())
    assert frames[-1]["type"] == "done" and all(s["type"] == "status" for s in statuses)


def test_engine_errors_raise_in_the_client(engine):
    async def main():
        async with await EngineClient.connect(engine.socket_path, max_frame_bytes=4096) as client:
            with pytest.raises(EngineError) as bad:
                await _collect(client, prompt="hi", params={"top_p": 0})
            with pytest.raises(EngineError) as big:
                await _collect(client, prompt="x" * 5000)
            return bad.value, big.value

    bad, big = run(main())
    assert (bad.code, bad.param) == ("invalid_request", "params.top_p")
    assert big.code == "frame_too_large"


# ---------------------------------------------------------------------------------------------- lifecycle


def test_shutdown_refuses_new_work_and_lets_running_streams_finish(model_dir, sock_dir):
    with Engine(model_dir, sock_dir / "e.sock", max_batch=1, delay_s=0.005) as engine:
        async def main():
            async with await EngineClient.connect(engine.socket_path) as client:
                stream = client.generate(prompt="hello", params=LONG)
                frames = [await stream.__anext__()]
                engine.call(engine.server.request_stop)
                await _wait_status(client, "to shutting down", lambda s: s["shutting_down"])
                with pytest.raises(EngineError) as refused:
                    await _collect(client, prompt="hello", params=GREEDY)
                frames += [f async for f in stream]
                return refused.value, frames

        refused, frames = run(main())
        assert refused.code == "shutting_down"
        assert frames[-1]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 200
        engine._thread.join(10)
        assert not engine.socket_path.exists()


def test_refuses_to_start_over_a_live_server(engine):
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.server import prepare_socket_path

    with pytest.raises(EdgeRuntimeError, match="already serving"):
        prepare_socket_path(engine.socket_path)


def test_serve_subprocess_systemd_notify_and_sigterm(model_dir, sock_dir):
    notify_path = sock_dir / "notify.sock"
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(notify_path))
    notify_sock.settimeout(30)
    stale = sock_dir / "engine.sock"
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).bind(str(stale))  # a dead server's socket file
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", str(model_dir), "--socket", str(stale),
         "--max-batch", "1", "--grace", "60"],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    messages: list[str] = []

    def wait_for(state: str) -> None:
        while not any(state in m.split("\n") for m in messages):
            messages.append(notify_sock.recv(4096).decode())

    try:
        wait_for("READY=1")
        assert (os.stat(stale).st_mode & 0o777) == 0o660
        wait_for("WATCHDOG=1")

        async def main():
            # One slot, DRAINED streams of 200 tokens each: seconds of work, so the signal lands
            # while they run (the engine's STATUS line at STOPPING=1 counts those in flight).
            async with await EngineClient.connect(stale) as client:
                started = asyncio.Event()

                async def consume(i: int) -> list[dict]:
                    frames = []
                    async for frame in client.generate(prompt="hello", params=LONG, id=f"s{i}"):
                        frames.append(frame)
                        started.set()
                    return frames

                tasks = [asyncio.create_task(consume(i)) for i in range(DRAINED)]
                await started.wait()
                await _wait_status(client, "every stream submitted",
                                   lambda s: s["running"] + s["queue_depth"] + s["completed"] == DRAINED)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        for frames in asyncio.run(asyncio.wait_for(main(), 90)):
            assert frames[-1]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 200
        assert proc.wait(30) == 0
        wait_for("STOPPING=1")
        draining = [line for m in messages for line in m.split("\n") if line.startswith("STATUS=draining ")]
        assert int(draining[0].split()[1]) >= 1, messages  # streams were in flight when the signal landed
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
        notify_sock.close()
    assert not stale.exists()
    logs = [line for line in stderr.splitlines() if line.startswith("{")]
    assert any('"msg": "serving"' in line for line in logs), stderr


class _StubScheduler:
    def __init__(self, heartbeat_age_s: float) -> None:
        self.age = heartbeat_age_s

    def status(self) -> dict:
        return {"heartbeat_age_s": self.age, "running": 1, "queue_depth": 0}


@pytest.mark.parametrize("age, pings", [(0.01, True), (60.0, False)])
def test_watchdog_pings_only_while_the_engine_thread_goes_round(sock_dir, monkeypatch, age, pings):
    notify_path = sock_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(notify_path))
        notify_sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))

        async def main():
            server = EngineServer(_StubScheduler(age), None, {}, sock_dir / "e.sock", max_frame_bytes=4096, grace_s=0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.watchdog(0.02), 0.2)

        run(main())
        received = []
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(notify_sock.recv(4096).decode())
    assert any("WATCHDOG=1" in m for m in received) == pings


def test_json_logs_carry_extra_fields(capsys):
    import json
    import logging

    from edge_runtime.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info")
        logging.getLogger("edge_runtime.server").info("request finished", extra={"request_id": "c1-1-a", "conn": "c1"})
        logging.getLogger("edge_runtime.server").debug("not shown")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert {k: entry[k] for k in ("level", "logger", "msg", "request_id", "conn")} == {
        "level": "info", "logger": "edge_runtime.server", "msg": "request finished", "request_id": "c1-1-a", "conn": "c1"}
    assert entry["ts"].endswith("+00:00")
