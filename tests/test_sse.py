"""Job streams drop a follower that stops reading, with one watchdog, not a timer per send."""

from __future__ import annotations

import asyncio
import time

import pytest

from hive.streams.sse import JobEventStream, StallWatchdog

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


async def frames():
    n = 0
    while True:
        n += 1
        yield f"id: {n}\nevent: token\ndata: {{}}\n\n".encode()
        await asyncio.sleep(0.01)


def test_a_follower_that_stops_reading_is_dropped_and_a_reading_one_is_not():
    async def run():
        watchdog = StallWatchdog(bound_s=0.3, every_s=0.05)
        watchdog.start()
        never = asyncio.Event()
        sent = {"reader": 0, "stalled": 0}

        def send_for(name: str, stall_after: int | None):
            async def send(message):
                if message["type"] == "http.response.body" and message.get("more_body"):
                    sent[name] += 1
                    if stall_after is not None and sent[name] > stall_after:
                        await never.wait()  # the client's socket accepts nothing more

            return send

        async def receive():
            await never.wait()  # no disconnect

        scope = {"type": "http", "method": "GET"}
        stalled = JobEventStream(frames(), ping=60, watchdog=watchdog)
        reader = JobEventStream(frames(), ping=60, watchdog=watchdog)
        started = time.monotonic()
        reading = asyncio.create_task(reader(scope, receive, send_for("reader", None)))
        await asyncio.wait_for(stalled(scope, receive, send_for("stalled", 5)), 5)
        dropped_after = time.monotonic() - started
        assert not reading.done()
        assert watchdog.streams == {reader}
        reading.cancel()
        await watchdog.stop()
        return dropped_after, sent

    dropped_after, sent = asyncio.run(run())
    assert 0.3 <= dropped_after < 2.0
    assert sent["stalled"] == 6 and sent["reader"] > 6
