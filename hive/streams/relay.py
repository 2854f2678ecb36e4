"""Relaying job events to SSE followers: a replay from the job's log, then live.

One pub/sub connection per hive process subscribes to the channels of the jobs
that have followers and fans each message out to all of them, pre-encoded once
as an SSE frame. A follower first waits for its channel's subscription, then
reads the log after its last id, then takes live frames, skipping what it has
and filling any gap (a lagging follower, a missed message) from the log, so it
gets every event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import anyio
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.sentinel import SentinelConnectionPool

from hive.streams.inbox import Follower, Frame
from shared import events, keys
from shared.connections import REDIS_DOWN
from shared.events import DONE_FRAME, TERMINAL_TYPES, Error

log = logging.getLogger("hive.relay")

#: A follower that has heard nothing for this long (up to twice as long) re-reads
#: the log: a safety net for messages pub/sub lost (a reconnect, say). Cheap: one
#: XRANGE per quiet stream, and one sweep of the followers per period, not a timer each.
CATCH_UP_S = 5.0
#: How long a new follower waits for Redis to confirm its channel's subscription.
SUBSCRIBE_TIMEOUT_S = 10.0

#: A stream whose Redis goes away waits this long for it before it ends (a Sentinel
#: failover takes its down-after time plus about a second).
OUTAGE_GRACE_S = 8.0
OUTAGE_POLL_S = 0.5
#: With Sentinel, how often the relay checks that it listens to the master.
MASTER_CHECK_S = 1.0


@dataclass
class _Cursor:
    """Where a stream stands: the last event id it sent (a wait for Redis resumes there)."""

    last: int


def _stream_error_frame(error: Error) -> bytes:
    """An error of the stream, not of the job: no id, so a resume starts after the
    last job event this client received."""
    return f"event: error\ndata: {error.to_json()}\n\n".encode()


@dataclass
class _Channel:
    subscribed: asyncio.Future
    followers: set[Follower] = field(default_factory=set)


class EventRelay:
    def __init__(self, connection: aioredis.Redis):
        self.redis = connection
        self.pubsub = connection.pubsub()
        self._channels: dict[str, _Channel] = {}
        # SUBSCRIBEs sent per channel and not yet confirmed: after a quick
        # unsubscribe/resubscribe only the last confirmation means "subscribed now".
        self._unconfirmed: dict[str, int] = {}
        self._reader: asyncio.Task | None = None
        #: The pub/sub connection was lost: the reader reconnects it, nobody else.
        self._reconnecting = False
        self._tasks: set[asyncio.Task] = set()
        #: Set by sse-starlette (``shutdown_event``) when uvicorn begins to shut down.
        self.stopping: anyio.Event | None = None

    async def start(self, redis_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """``redis_ready``: awaited before the first subscription, so that a hive
        started before Redis serves (its /health answers 503) and relays once Redis answers."""
        try:
            # A channel of our own keeps the connection subscribed while no job is followed;
            # subscribed before the reader starts, so followers' joins never race it.
            await self.pubsub.subscribe(keys.relay_channel())
            subscribed = True
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            subscribed = False  # no Redis yet: the reader waits for it, then subscribes
        self._reader = asyncio.create_task(self._read_forever(subscribed, redis_ready), name="hive-relay")
        self.stopping = anyio.Event()
        self._spawn(self._end_streams_on_shutdown())
        self._spawn(self._catch_up_quiet_followers())
        if isinstance(self.redis.connection_pool, SentinelConnectionPool):
            self._spawn(self._follow_the_master())

    async def _catch_up_quiet_followers(self) -> None:
        """Every CATCH_UP_S, a follower that has waited a whole period with nothing
        handed over is woken to re-read the log."""
        while True:
            await asyncio.sleep(CATCH_UP_S)
            for entry in self._channels.values():
                for follower in entry.followers:
                    if follower.waiter is None:
                        continue  # busy sending: not quiet
                    follower.quiet_sweeps += 1
                    if follower.quiet_sweeps >= 2:
                        follower.quiet_sweeps = 0
                        follower.catch_up = True
                        follower.wake()

    async def _follow_the_master(self) -> None:
        """With Sentinel: the pub/sub connection only listens, so nothing tells it
        that its server was demoted in a failover (a writer gets READONLY): it would
        hear nothing more, and followers would wait for the catch-up sweep. Once a
        second, the Sentinels are asked where the master is; a connection to any other
        server is dropped, and the reader reconnects to the master and resubscribes."""
        while True:
            await asyncio.sleep(MASTER_CHECK_S)
            connection = self.pubsub.connection
            if connection is None or self._reconnecting or not connection.is_connected:
                continue
            try:
                master = await self.redis.connection_pool.get_master_address()
            except redis.exceptions.RedisError:
                continue  # no master to move to yet
            if (connection.host, connection.port) != tuple(master):
                log.warning("relay: the master is now %s:%s; resubscribing there", *master)
                await connection.disconnect()

    def _wake_all(self, catch_up: bool = False, stopping: bool = False) -> None:
        for entry in self._channels.values():
            for follower in entry.followers:
                follower.catch_up |= catch_up
                follower.stopping |= stopping
                follower.wake()

    async def _end_streams_on_shutdown(self) -> None:
        """On shutdown every open stream ends cleanly with an id-less ``error``
        SHUTTING_DOWN and ``[DONE]`` instead of being cut mid-chunk; its job goes on,
        and the client resumes it (Last-Event-ID) on another or the restarted hive."""
        await self.stopping.wait()
        log.info("shutting down: ending %d open streams", self.followers)
        self._wake_all(stopping=True)

    async def stop(self) -> None:
        for task in (self._reader, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*filter(None, (self._reader, *self._tasks)), return_exceptions=True)
        await self.pubsub.aclose()

    @property
    def followers(self) -> int:
        return sum(len(c.followers) for c in self._channels.values())

    async def _read_forever(self, subscribed: bool, redis_ready: Callable[[], Awaitable[None]] | None) -> None:
        if not subscribed and redis_ready is not None:
            try:
                await redis_ready()
            except Exception as e:  # a setting (a refused password): /health reports it; nothing to relay
                log.error("relay: cannot use Redis: %s", e)
                return
        while True:
            try:
                if not subscribed:
                    await self.pubsub.subscribe(keys.relay_channel())
                    subscribed = True
                if self._reconnecting:
                    await self.pubsub.ping()  # reconnects, and redis-py subscribes every channel again
                    self._reconnecting = False
                async for message in self.pubsub.listen():
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection loop boundary: log, back off, resubscribe
                self._reconnecting = True
                if isinstance(e, REDIS_DOWN):  # an outage or a failover: said, not a bug
                    log.warning("relay lost its Redis subscription (%s); reconnecting", e)
                else:
                    log.exception("relay lost its Redis subscription; reconnecting")
                # Messages published meanwhile are lost to pub/sub: every follower
                # re-reads the log now (and ends with REDIS_UNAVAILABLE if Redis is gone).
                self._wake_all(catch_up=True)
                await asyncio.sleep(1.0)

    def _dispatch(self, message: dict) -> None:
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if message["type"] == "subscribe" and channel in self._unconfirmed:
            self._unconfirmed[channel] -= 1
            if self._unconfirmed[channel]:
                return
            del self._unconfirmed[channel]
        entry = self._channels.get(channel)
        if entry is None:
            return
        if message["type"] == "subscribe":
            if not entry.subscribed.done():
                entry.subscribed.set_result(None)
        elif message["type"] == "message":
            seq, type_, data = events.parse_live_message(message["data"])
            frame = (seq, type_, events.sse_frame(seq, type_, data))
            for follower in entry.followers:
                follower.put(frame)

    async def _join(self, job_id: str, follower: Follower) -> None:
        channel = keys.job_channel(job_id)
        entry = self._channels.get(channel)
        if entry is None:
            if self._reconnecting:
                # The reader reconnects the pub/sub connection; a SUBSCRIBE now would
                # connect it a second time, concurrently. follow() waits and comes back.
                raise redis.exceptions.ConnectionError("the relay is reconnecting to Redis")
            entry = self._channels[channel] = _Channel(asyncio.get_running_loop().create_future())
            self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
            try:
                await self.pubsub.subscribe(channel)
            except BaseException:  # never sent: no confirmation will come for it
                self._unconfirmed[channel] -= 1
                if not self._unconfirmed[channel]:
                    del self._unconfirmed[channel]
                del self._channels[channel]
                raise
        entry.followers.add(follower)
        await asyncio.wait_for(asyncio.shield(entry.subscribed), SUBSCRIBE_TIMEOUT_S)

    def _leave(self, job_id: str, follower: Follower) -> bool:
        """Returns whether that was the job's last follower on this hive (then its
        channel is to be unsubscribed)."""
        channel = keys.job_channel(job_id)
        entry = self._channels.get(channel)
        if entry is None:
            return False
        entry.followers.discard(follower)
        if entry.followers:
            return False
        del self._channels[channel]
        return True

    async def read_log(self, job_id: str, after: int) -> list[Frame]:
        entries = await self.redis.xrange(keys.job_events(job_id), min=events.stream_id(after + 1))
        frames = []
        for entry_id, fields in entries:
            for seq, type_, data in events.log_events(entry_id, fields["e"], fields["d"]):
                if seq > after:  # a compacted run the client is partway through
                    frames.append((seq, type_, events.sse_frame(seq, type_, data)))
        return frames

    async def _ended_by(self, job_id: str, last: int) -> bool:
        """Whether the job's log ends with a terminal event at or before ``last``."""
        tail = await self.redis.xrevrange(keys.job_events(job_id), count=1)
        return bool(tail) and events.seq_of(tail[0][0]) <= last and tail[0][1]["e"] in TERMINAL_TYPES

    async def follow(
        self, job_id: str, last_id: int = 0, on_abandon: Callable[[str], Awaitable] | None = None
    ) -> AsyncIterator[bytes]:
        """SSE frames of the job after ``last_id``, ending with ``[DONE]`` after
        the terminal event; the frames ready at once come as one chunk. ``on_abandon(job_id)`` runs when the last follower of
        an unfinished job goes away (``cancel_on_disconnect``).

        Redis going away for up to OUTAGE_GRACE_S (a Sentinel failover, a restart)
        only pauses the stream: it goes on from its last event once Redis answers.
        Longer, the stream ends with an ``error`` frame that has no id (the job
        itself has not failed: reconnect with Last-Event-ID later)."""
        cursor = _Cursor(last_id)
        down_since: float | None = None
        while True:
            try:
                async for frame in self._follow(job_id, cursor, on_abandon):
                    down_since = None
                    yield frame
                return
            except (*REDIS_DOWN, asyncio.TimeoutError) as e:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since < OUTAGE_GRACE_S and not (self.stopping is not None and self.stopping.is_set()):
                    await asyncio.sleep(OUTAGE_POLL_S)
                    continue
                log.warning("job %s: ending a stream, Redis is unavailable: %s", job_id, e)
                error = Error("REDIS_UNAVAILABLE", "the hive lost Redis; reconnect with Last-Event-ID once /health is ok")
                yield _stream_error_frame(error)
                yield DONE_FRAME
                return

    async def _follow(
        self, job_id: str, cursor: "_Cursor", on_abandon: Callable[[str], Awaitable] | None
    ) -> AsyncIterator[bytes]:
        follower = Follower()
        last = cursor.last
        finished = False
        redis_lost = False
        try:
            await self._join(job_id, follower)
            pending: list[Frame] = await self.read_log(job_id, last)
            from_log = True
            if not pending and await self._ended_by(job_id, last):
                finished = True
                yield DONE_FRAME  # resumed after the job's last event
                return
            while True:
                if follower.stopping or (self.stopping is not None and self.stopping.is_set()):
                    error = Error("SHUTTING_DOWN", "the hive is shutting down; reconnect with Last-Event-ID to resume")
                    yield _stream_error_frame(error)
                    yield DONE_FRAME
                    return
                gap = False
                # The frames ready now go out as one chunk: one send (one syscall) for
                # all of them, not one per frame and follower (bench/fanout.py).
                batch: list[bytes] = []
                for seq, type_, frame in pending:
                    if seq <= last:
                        if type_ in TERMINAL_TYPES:
                            # Never sent by this stream (it ends on its terminal event),
                            # and a client resuming past the end got [DONE] above: a
                            # failover lost events, and their ids were written again (a
                            # hive's WORKER_LOST, say). Sent without an id, as ids never
                            # go backwards; a resume then finds the end.
                            finished = True
                            batch.append(frame.split(b"\n", 1)[1])
                            break
                        continue  # already sent: it came from the log, then again live
                    if seq > last + 1:
                        if not from_log:
                            gap = True  # a live frame ahead of us: the log has what is between
                            break
                        # The log itself lacks them: lost in a failover, said out loud.
                        log.warning("job %s: events %d..%d are lost (a Redis failover)", job_id, last + 1, seq - 1)
                        batch.append(events.gap_frame(last + 1, seq - 1))
                    if type_ in TERMINAL_TYPES:
                        finished = True
                    batch.append(frame)
                    last = seq
                    if finished:
                        break
                if finished:
                    batch.append(DONE_FRAME)
                if batch:
                    cursor.last = last
                    yield b"".join(batch)
                if finished:
                    return
                if gap:
                    pending, from_log = await self.read_log(job_id, last), True
                    continue
                pending, from_log = [], False
                if not follower.frames and follower.lagging:  # what was dropped is in the log
                    follower.lagging = False
                    pending, from_log = await self.read_log(job_id, last), True
                    continue
                await follower.wait()
                if follower.catch_up:
                    follower.catch_up = False
                    pending, from_log = await self.read_log(job_id, last), True
                    continue  # the inbox's frames next round: those already sent are skipped
                pending = follower.take()
        except (*REDIS_DOWN, asyncio.TimeoutError):
            redis_lost = True  # follow() waits for Redis and follows again: not abandoned
            raise
        finally:
            alone = self._leave(job_id, follower)
            if on_abandon is not None and alone and not finished and not redis_lost:
                self._spawn(self._abandon(on_abandon, job_id))
            if alone:
                try:
                    await self.pubsub.unsubscribe(keys.job_channel(job_id))
                except redis.exceptions.RedisError as e:  # gone with the connection anyway
                    log.debug("unsubscribing from job %s: %s", job_id, e)

    def _spawn(self, coroutine) -> None:
        # Not awaited here: a disconnecting client's stream is being torn down.
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _abandon(on_abandon: Callable[[str], Awaitable], job_id: str) -> None:
        try:
            await on_abandon(job_id)
            log.info("job %s: last follower left; cancelled (cancel_on_disconnect)", job_id)
        except Exception as e:  # the job may have finished meanwhile; nothing else to do
            log.info("job %s: last follower left; not cancelled: %s", job_id, e)
