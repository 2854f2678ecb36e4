"""The hive's relay against a real redis-server, with the worker's own publisher."""

from __future__ import annotations

import asyncio
import uuid

import hiredis
import pytest
import redis
import redis.asyncio as aioredis

from hive.streams import inbox as inbox_module
from hive.streams import relay as relay_module
from hive.streams.relay import EventRelay
from shared import keys
from shared.clock import RedisClock
from shared.events import DONE_FRAME, End, Queued, Token
from worker.cluster.reporter import JobReporter
from worker.engine.step_writer import StepWriter

pytestmark = pytest.mark.e2e


def ids_of(chunks: list[bytes]) -> list[int]:
    """The event ids in the order sent; a chunk holds one or more frames."""
    return [int(line.removeprefix(b"id: ")) for chunk in chunks for line in chunk.split(b"\n") if line.startswith(b"id: ")]


async def _follow_while_publishing(redis_url: str, followers: int, tokens: int) -> list[list[bytes]]:
    connection = aioredis.Redis.from_url(redis_url, decode_responses=True)
    relay = EventRelay(connection)
    await relay.start()
    job_id = uuid.uuid4().hex
    sync = redis.Redis.from_url(redis_url)
    reporter = JobReporter(sync, RedisClock(sync), job_id, 60)
    reporter.emit(Queued(1))
    streams = [relay.follow(job_id) for _ in range(followers)]
    received: list[list[bytes]] = [[await anext(s)] for s in streams]  # each has joined
    writer = StepWriter(sync)
    for i in range(tokens):  # as the engine sends them: one pipeline a step, replies read later
        writer.send(reporter.token_commands(Token(f"t{i}", i)))
    writer.flush()
    reporter.emit(End(tokens, 1.0, 1.0, "max_tokens"))
    for stream, frames in zip(streams, received):
        frames.extend([frame async for frame in stream])
    assert relay.followers == 0  # everyone left: the channel is released
    await relay.stop()
    await connection.aclose()
    sync.close()
    return received


def test_followers_with_tiny_buffers_get_every_event_once_in_order(redis_url, monkeypatch):
    # Two frames of buffer: a follower that falls behind reads the rest from the log,
    # at once, not after the idle catch-up timer (made long here, so a stall fails).
    monkeypatch.setattr(inbox_module, "FOLLOWER_BUFFER", 2)
    monkeypatch.setattr(relay_module, "CATCH_UP_S", 60.0)
    received = asyncio.run(asyncio.wait_for(_follow_while_publishing(redis_url, followers=3, tokens=200), 20))
    for frames in received:
        assert ids_of(frames) == list(range(1, 203))
        assert frames[-1].endswith(DONE_FRAME) and b"".join(frames).count(DONE_FRAME) == 1


def test_a_quiet_follower_catches_up_from_the_log_what_pub_sub_never_delivered(redis_url, monkeypatch):
    # Events appended to the log but never published (as if pub/sub lost them while
    # the relay reconnected) reach the follower by the catch-up sweep.
    monkeypatch.setattr(relay_module, "CATCH_UP_S", 0.1)

    async def run() -> list[bytes]:
        connection = aioredis.Redis.from_url(redis_url, decode_responses=True)
        relay = EventRelay(connection)
        await relay.start()
        job_id = uuid.uuid4().hex
        sync = redis.Redis.from_url(redis_url)
        JobReporter(sync, RedisClock(sync), job_id, 60).emit(Queued(1))
        stream = relay.follow(job_id)
        frames = [await anext(stream)]
        for seq, event in ((2, Token("lost", 0)), (3, End(1, 1.0, 1.0, "max_tokens"))):
            sync.xadd(keys.job_events(job_id), {"e": event.type, "d": event.to_json()}, id=f"{seq}-0")
        frames.extend([frame async for frame in stream])
        await relay.stop()
        await connection.aclose()
        sync.close()
        return frames

    frames = asyncio.run(asyncio.wait_for(run(), 5))
    assert ids_of(frames) == [1, 2, 3] and frames[-1].endswith(DONE_FRAME)


def test_a_token_behind_the_log_is_dropped_and_the_batch_goes_on(redis_url):
    """A job a hive took over has an event past its tokens (its lease ran out): Redis
    refuses the late tokens' ids. Only they are lost; the step does not fail."""
    sync = redis.Redis.from_url(redis_url)
    reporter = JobReporter(sync, RedisClock(sync), uuid.uuid4().hex, 60)
    reporter.emit(Queued(1))
    writer = StepWriter(sync)
    writer.send(reporter.token_commands(Token("a", 0)))
    reporter.seq -= 1  # the next token reuses id 2: the log refuses it
    writer.send(reporter.token_commands(Token("b", 1)))
    writer.flush()
    writer.send(reporter.token_commands(Token("c", 2)))  # the same connection, still in step
    writer.release()
    assert len(sync.connection_pool._in_use_connections) == 0
    assert [fields[b"e"] for _, fields in sync.xrange(keys.job_events(reporter.job_id))] == [b"queued", b"token", b"token"]
    sync.close()


def test_any_other_refusal_fails_the_next_step_and_the_connection_goes_back(redis_url):
    sync = redis.Redis.from_url(redis_url)
    reporter = JobReporter(sync, RedisClock(sync), uuid.uuid4().hex, 60)
    reporter.emit(Queued(1))
    sync.set(keys.job_events("wrong-type"), "not a stream")
    writer = StepWriter(sync)
    writer.send([hiredis.pack_command(("XADD", keys.job_events("wrong-type"), "*", "e", "token"))])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        writer.flush()
    assert len(sync.connection_pool._in_use_connections) == 0
    reporter.emit(End(1, 1.0, 1.0, "max_tokens"))  # the job goes on with a healthy connection
    assert [fields[b"e"] for _, fields in sync.xrange(keys.job_events(reporter.job_id))] == [b"queued", b"end"]
    sync.delete(keys.job_events("wrong-type"))
    sync.close()
