"""A finished job's replay log is compacted (shared/events.py, COMPACT_TOKENS): runs of
token entries become one entry each, on a real redis-server, and every reader (the
relay, a follower resuming anywhere, even inside a run) gets the same ids and JSON as
from the log before it was compacted."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from hive.streams.relay import EventRelay
from shared import events, keys
from shared.events import End, Queued, Started, Token

pytestmark = pytest.mark.e2e


def _write(client, key: str, entries: list[tuple[int, events.Event]]) -> None:
    for seq, event in entries:
        client.xadd(key, {"e": event.type, "d": event.to_json()}, id=events.stream_id(seq))


def _expanded(client, key: str) -> list[tuple[int, str, str]]:
    return [e for entry_id, f in client.xrange(key) for e in events.log_events(entry_id, f["e"], f["d"])]


@pytest.mark.timeout(30)
def test_compaction_keeps_every_id_and_byte_and_shrinks_the_log(redis_client, redis_url):
    job_id = uuid.uuid4().hex
    key = keys.job_events(job_id)
    pieces = ["Hello", ",", " wörld", "", " 🐝", "\n", '"quoted"', " \\ back", " end"]
    log = [(1, Queued(1)), (2, Started(job_id, "acme/tiny", "w", 1.0))]
    log += [(3 + k, Token(text, k)) for k, text in enumerate(pieces[:5])]
    # Events 8 and 9 were lost in a failover: the run breaks there, and so do its ids.
    log += [(10 + k, Token(text, 7 + k)) for k, text in enumerate(pieces[7:])]
    log += [(12, End(9, 1.0, 1.0, "max_tokens"))]
    _write(redis_client, key, log)
    redis_client.expire(key, 1000)
    before = _expanded(redis_client, key)
    assert [seq for seq, _, _ in before] == [1, 2, 3, 4, 5, 6, 7, 10, 11, 12]

    saved = redis_client.register_script(events.COMPACT_TOKENS)(keys=[key])
    assert saved == 5  # 7 token entries in two runs: 2 entries
    assert redis_client.xlen(key) == 5
    assert _expanded(redis_client, key) == before
    assert 0 < redis_client.ttl(key) <= 1000
    assert redis_client.register_script(events.COMPACT_TOKENS)(keys=[key]) == 0  # once is enough

    async def read(after: int) -> list[tuple[int, str]]:
        connection = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            return [(seq, type_) for seq, type_, _ in await EventRelay(connection).read_log(job_id, after)]
        finally:
            await connection.aclose()

    # A follower resuming inside a compacted run gets exactly what comes after its id.
    assert asyncio.run(read(4)) == [(5, "token"), (6, "token"), (7, "token"), (10, "token"), (11, "token"), (12, "end")]
    assert asyncio.run(read(0))[0] == (1, "queued")


@pytest.mark.timeout(30)
def test_tokens_with_logprobs_and_tool_calls_are_kept_as_they_are(redis_client):
    """A run holds text only: a token with its logprobs, and a tool call's part, stay
    whole entries, so no reader loses them to compaction."""
    from shared.events import ToolCallDelta

    job_id = uuid.uuid4().hex
    key = keys.job_events(job_id)
    item = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    log = [(1, Token("a", 0)), (2, Token("b", 1)), (3, Token("c", 2, item)), (4, Token("d", 3)), (5, Token("e", 4))]
    log += [(6, ToolCallDelta(0, "call_1", "f", "")), (7, ToolCallDelta(0, None, None, '{"x": 1}')), (8, End(5, 1.0, 1.0, "tool_calls"))]
    _write(redis_client, key, log)
    before = _expanded(redis_client, key)
    assert redis_client.register_script(events.COMPACT_TOKENS)(keys=[key]) == 2  # runs [1, 2] and [4, 5]
    assert _expanded(redis_client, key) == before
