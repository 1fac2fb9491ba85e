"""The pieces of offload that need no broker: the reply assembler (order, duplicates, gaps,
timeouts), the wire format, the circuit breaker and the config tables."""

from __future__ import annotations

import asyncio
import random

import msgpack
import pytest

from edge_wire.settings import ConfigError
from proxy.core.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from proxy.offload import OffloadFailed, ReplyAssembler, protocol
from proxy.offload.assembler import MAX_PENDING
from proxy.offload.config import cloud_config_from, devices_config_from, offload_config_from


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def chunks(n_tokens: int) -> list[dict]:
    out = [{"type": "accepted"}]
    out += [{"type": "token", "text": f"t{i} "} for i in range(n_tokens)]
    out.append({"type": "done", "finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": n_tokens,
                                                                       "total_tokens": n_tokens + 1}})
    return [{**chunk, "worker": "w1"} for chunk in out]  # every chunk names its worker, as CloudWorker's do


async def collect(assembler: ReplyAssembler, accept: float = 1.0, idle: float = 1.0) -> list[dict]:
    return [frame async for frame in assembler.frames(accept, idle)]


def test_in_order_chunks_pass_through_once_and_accepted_is_consumed():
    async def main():
        a = ReplyAssembler("r1")
        for seq, chunk in enumerate(chunks(3)):
            a.feed(seq, chunk)
        frames = await collect(a)
        assert [f["type"] for f in frames] == ["token", "token", "token", "done"]
        assert a.worker == "w1" and a.finished and a.duplicates == 0

    run(main())


def test_shuffled_and_duplicated_chunks_come_out_in_order_once():
    async def main():
        rng = random.Random(7)
        for _ in range(20):
            sent = list(enumerate(chunks(12)))
            redelivered = sent + rng.sample(sent, 6)  # QoS 1 may deliver any of them again
            rng.shuffle(redelivered)
            a = ReplyAssembler("r")
            consumer = asyncio.ensure_future(collect(a))
            for seq, chunk in redelivered:
                a.feed(seq, chunk)
                await asyncio.sleep(0)
            frames = await consumer
            assert "".join(f.get("text", "") for f in frames) == "".join(f"t{i} " for i in range(12))
            assert frames[-1]["type"] == "done" and a.duplicates == 6

    run(main())


def test_when_two_workers_answer_the_first_to_send_chunk_0_owns_the_answer():
    async def main():
        a = ReplyAssembler("r")
        mine = [{**c, "worker": "A"} for c in chunks(3)]
        theirs = [{**c, "worker": "B"} for c in chunks(3)]
        a.feed(2, mine[2])  # before anyone's chunk 0: held by worker
        a.feed(1, theirs[1])
        a.feed(0, mine[0])
        for seq in (1, 3, 4):
            a.feed(seq, theirs[seq])
            a.feed(seq, mine[seq])
        frames = await collect(a)
        assert [f["worker"] for f in frames] == ["A"] * 4 and a.worker == "A" and a.strays == 4

    run(main())


def test_a_chunk_not_naming_the_claiming_worker_is_a_stray():
    async def main():
        a = ReplyAssembler("r")
        sent = chunks(2)
        a.feed(0, sent[0])
        a.feed(1, {"type": "token", "text": "forged "})  # names no worker
        a.feed(1, {**sent[1], "worker": "w2", "text": "forged "})
        for seq in (1, 2, 3):
            a.feed(seq, sent[seq])
        frames = await collect(a)
        assert "".join(f.get("text", "") for f in frames) == "t0 t1 " and a.strays == 2

    run(main())


def test_chunks_after_the_end_are_ignored():
    async def main():
        a = ReplyAssembler("r")
        for seq, chunk in enumerate(chunks(1)):
            a.feed(seq, chunk)
        a.feed(7, {"type": "token", "text": "late"})
        assert [f["type"] for f in await collect(a)] == ["token", "done"]

    run(main())


def test_a_quiet_cloud_times_out_cleanly():
    async def main():
        nobody = ReplyAssembler("r")
        with pytest.raises(OffloadFailed) as exc:
            await collect(nobody, accept=0.1)
        assert exc.value.reason == "timeout" and "no cloud worker took" in str(exc.value)

        stalled = ReplyAssembler("r")
        stalled.feed(0, {"type": "accepted"})
        stalled.feed(1, {"type": "token", "text": "a"})
        stalled.feed(3, {"type": "token", "text": "c"})  # chunk 2 never comes
        got = []
        with pytest.raises(OffloadFailed) as exc:
            async for frame in stalled.frames(1.0, 0.1):
                got.append(frame["text"])
        assert got == ["a"] and exc.value.reason == "timeout" and "stopped answering" in str(exc.value)

    run(main())


def test_failures_fed_in_end_the_stream_and_the_gap_buffer_is_bounded():
    async def main():
        a = ReplyAssembler("r")
        a.feed(0, {"type": "accepted"})
        a.fail(OffloadFailed("lost", "broker gone"))
        with pytest.raises(OffloadFailed) as exc:
            await collect(a)
        assert exc.value.reason == "lost"

        b = ReplyAssembler("r")
        for seq in range(1, MAX_PENDING + 2):  # chunk 0 missing, forever
            b.feed(seq, {"type": "token", "text": "x"})
        with pytest.raises(OffloadFailed) as exc:
            await collect(b)
        assert exc.value.reason == "broken"

    run(main())


def test_wire_format_round_trips_and_refuses_garbage():
    payload = protocol.encode_request(request_id="gw-1.ab.sc1", gateway="gw-1", reply_to="edge/gw-1/offload/reply",
                                      timeout_s=30, kind="chat", model="m", prompt={"messages": [{"role": "user", "content": "hi"}]},
                                      params={"max_tokens": 4}, extra={"tools": None, "trace": {"traceparent": "x"}}, now=1000.0)
    request = protocol.parse_request(protocol.decode(payload))
    assert request.deadline == 1030.0 and request.reply_to == "edge/gw-1/offload/reply"
    assert request.prompt_fields() == {"messages": [{"role": "user", "content": "hi"}]}
    assert request.structured() == {} and request.trace == {"traceparent": "x"}
    chunk = protocol.decode(protocol.encode_chunk("gw-1.ab.sc1", 3, {"id": "engine-id", "type": "token", "text": "a"}))
    assert protocol.parse_chunk(chunk) == ("gw-1.ab.sc1", 3, chunk) and chunk["id"] == "gw-1.ab.sc1"
    for bad in (b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"v": 2}), msgpack.packb({"v": 1, "id": "a/b"}),
                msgpack.packb({"v": 1, "id": "a", "kind": "chat", "prompt": "x", "messages": []})):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_request(protocol.decode(bad))
    for bad in ({"id": "a", "seq": -1, "type": "token", "text": ""}, {"id": "a", "seq": True, "type": "done"},
                {"id": "a", "seq": 1, "type": "surprise"}, {"id": "a", "seq": 1, "type": "token", "text": 5}):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_chunk(bad)


def test_breaker_opens_after_failures_and_probes_after_the_cooldown():
    now = [0.0]
    b = Breaker("cloud", failures=2, cooldown_s=5, clock=lambda: now[0])
    assert b.allow() and b.state == CLOSED
    b.failure()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN and not b.allow() and b.retry_after_s() == 5
    now[0] = 5.0
    assert b.state == HALF_OPEN and b.allow() and not b.allow()  # one probe at a time
    b.failure()  # the probe failed: open again, for a whole cool-down
    assert b.state == OPEN and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.release()  # the probe went away without a verdict: another may go
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow() and b.allow()


def test_config_tables_are_checked_with_the_key_named():
    assert offload_config_from({}, None).max_wait_s == 5.0
    assert devices_config_from({"devices": {"rate_limit_requests_per_min": 0}}, None).rate_limit_requests_per_min == 0
    cases = [
        (offload_config_from, {"offload": {"max_wait_s": -1}}, "max_wait_s"),
        (offload_config_from, {"offload": {"breaker_failures": 0}}, "breaker_failures"),
        (offload_config_from, {"offload": {"nope": 1}}, "unknown key 'nope'"),
        (devices_config_from, {"devices": {"reply_prefix": "edge/+/x"}}, "reply_prefix"),
        (devices_config_from, {"devices": {"default_temperature": 3}}, "default_temperature"),
        (cloud_config_from, {"cloud": {"upstream": "ftp://x"}}, "upstream"),
        (cloud_config_from, {"cloud": {"upstream": "http://user:pw@x/v1"}}, "must not carry credentials"),
        (cloud_config_from, {"cloud": {"share_group": "a/b"}}, "share_group"),
    ]
    for load, data, needle in cases:
        with pytest.raises(ConfigError) as exc:
            load(data, None)
        assert needle in str(exc.value)
    assert cloud_config_from({}, None, {"EDGE_CLOUD_UPSTREAM_API_KEY": "sk"}).upstream_api_key == "sk"
