"""The engine's frame protocol without a server: framing, reading frames off a stream, and
the validation of every client op."""

import asyncio
import struct

import msgpack
import pytest

from edge_runtime import protocol
from edge_wire import frames, messages
from edge_wire.frames import ProtocolError
from edge_wire.messages import CancelOp, GenerateOp, ModelsOp, StatusOp, parse_op


def _read(data: bytes, max_size: int = frames.DEFAULT_MAX_FRAME, eof: bool = True):
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await frames.read_frame(reader, max_size)

    return asyncio.run(run())


def _frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_round_trip_and_clean_eof():
    frame = {"id": "a", "type": "token", "text": "héllo", "token_id": 7}
    data = frames.encode_frame(frame)
    assert data[:4] == struct.pack(">I", len(data) - 4)
    assert _read(data) == frame
    assert _read(b"") is None


@pytest.mark.parametrize(
    "data, code, fatal",
    [
        (b"\x00\x00", "bad_frame", True),  # stream ends inside the length prefix
        (struct.pack(">I", 10) + b"\x81", "bad_frame", True),  # ... inside the payload
        (_frame_of(b"\xc1\xc1"), "bad_frame", True),  # 0xc1 is never valid msgpack
        (_frame_of(msgpack.packb({"a": 1}) + b"\x01"), "bad_frame", True),  # trailing bytes
        (_frame_of(b""), "bad_frame", True),
        (_frame_of(msgpack.packb([1, 2])), "bad_frame", False),  # well-formed, not a map: framing intact
        (_frame_of(msgpack.packb("op")), "bad_frame", False),
        (struct.pack(">I", 0xFFFFFFFF), "frame_too_large", True),
    ],
)
def test_bad_frames(data, code, fatal):
    with pytest.raises(ProtocolError) as info:
        _read(data)
    assert (info.value.code, info.value.fatal) == (code, fatal)
    assert info.value.frame(None) == {"type": "error", "code": code, "message": info.value.message}


def test_frame_limit_is_the_payload_size():
    payload = msgpack.packb({"x": "y" * 100})
    assert _read(_frame_of(payload), max_size=len(payload)) == {"x": "y" * 100}
    with pytest.raises(ProtocolError, match="exceeds the limit of"):
        _read(_frame_of(payload), max_size=len(payload) - 1)


def test_parse_generate():
    op = parse_op({
        "op": "generate", "id": "r1", "prompt": "hi", "params": {"max_tokens": 3, "temperature": 0, "stop": "x"},
        "timeout_s": 2, "trace": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    })
    assert isinstance(op, GenerateOp)
    assert (op.id, op.prompt, op.params.max_tokens, op.params.stop, op.timeout_s) == ("r1", "hi", 3, ["x"], 2.0)
    assert parse_op({"op": "generate", "id": "m", "messages": [{"role": "user", "content": "x"}]}).messages
    assert parse_op({"op": "generate", "id": "i", "prompt_ids": [1, 2]}).prompt_ids == [1, 2]
    nil = parse_op({"op": "generate", "id": "n", "prompt": "hi", "params": {"temperature": None, "seed": None, "max_tokens": 4}})
    assert (nil.params.temperature, nil.params.seed, nil.params.max_tokens) == (1.0, None, 4)  # nil: the default


def test_parse_other_ops():
    assert parse_op({"op": "cancel", "id": "r1"}) == CancelOp("r1")
    assert parse_op({"op": "status"}) == StatusOp(None)
    assert parse_op({"op": "status", "id": "s"}) == StatusOp("s")
    assert parse_op({"op": "models", "id": "m"}) == ModelsOp("m")


@pytest.mark.parametrize(
    "frame, code, param",
    [
        ({}, "invalid_request", "op"),
        ({"op": "fly"}, "unknown_op", "op"),
        ({"op": 7}, "unknown_op", "op"),
        ({"op": "generate", "prompt": "x"}, "invalid_request", "id"),
        ({"op": "generate", "id": 5, "prompt": "x"}, "invalid_request", "id"),
        ({"op": "generate", "id": "x" * 129, "prompt": "x"}, "invalid_request", "id"),
        ({"op": "generate", "id": "a"}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "prompt": "x", "prompt_ids": [1]}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "prompt": 3}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "prompt": ""}, "invalid_request", "prompt"),
        ({"op": "generate", "id": "a", "messages": "hi"}, "invalid_request", "messages"),
        ({"op": "generate", "id": "a", "messages": [{"role": "user"}]}, "invalid_request", "messages[0].content"),
        ({"op": "generate", "id": "a", "messages": [3]}, "invalid_request", "messages[0]"),
        ({"op": "generate", "id": "a", "prompt_ids": [1, "2"]}, "invalid_request", "prompt_ids"),
        ({"op": "generate", "id": "a", "prompt_ids": [True]}, "invalid_request", "prompt_ids"),
        ({"op": "generate", "id": "a", "prompt": "x", "params": []}, "invalid_request", "params"),
        ({"op": "generate", "id": "a", "prompt": "x", "params": {"temperature": 5}}, "invalid_request", "params.temperature"),
        ({"op": "generate", "id": "a", "prompt": "x", "params": {"max_tokens": "9"}}, "invalid_request", "params.max_tokens"),
        ({"op": "generate", "id": "a", "prompt": "x", "params": {"colour": 1}}, "invalid_request", "params.colour"),
        ({"op": "generate", "id": "a", "prompt": "x", "timeout_s": 0}, "invalid_request", "timeout_s"),
        ({"op": "generate", "id": "a", "prompt": "x", "timeout_s": float("nan")}, "invalid_request", "timeout_s"),
        ({"op": "generate", "id": "a", "prompt": "x", "trace": "t"}, "invalid_request", "trace"),
        ({"op": "generate", "id": "a", "prompt": "x", "trace": {"baggage": "b"}}, "invalid_request", "trace.baggage"),
        ({"op": "generate", "id": "a", "prompt": "x", "stream": True}, "invalid_request", "stream"),
        ({"op": "cancel"}, "invalid_request", "id"),
        ({"op": "status", "verbose": True}, "invalid_request", "verbose"),
    ],
)
def test_invalid_ops(frame, code, param):
    with pytest.raises(ProtocolError) as info:
        parse_op(frame)
    assert (info.value.code, info.value.param, info.value.fatal) == (code, param, False)
    assert info.value.message


def test_frame_id_echoes_only_valid_ids():
    assert messages.frame_id({"id": "abc"}) == "abc"
    assert messages.frame_id({"id": 3}) is None
    assert messages.frame_id({"id": "x" * 129}) is None


def test_done_frame_fields():
    from edge_runtime.generate import Timings, Usage

    frame = protocol.done_frame("r", "stop", Usage(3, 4), Timings(0.1, 0.5, 7.5, 0.02))
    assert frame["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert frame["timings"] == {"ttft_s": 0.1, "total_s": 0.5, "decode_tokens_per_s": 7.5, "queue_s": 0.02}
    assert protocol.done_frame("r", "cancelled", None, None)["usage"]["total_tokens"] == 0
