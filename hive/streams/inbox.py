"""A follower's inbox: the frames the relay hands over to one stream, and that
stream's wake-up (hive/streams/relay.py)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

Frame = tuple[int, str, bytes]  # (seq, type, SSE bytes)

#: Frames buffered per follower; a follower further behind reads from the log.
FOLLOWER_BUFFER = 4096


@dataclass(eq=False)
class Follower:
    """One stream's inbox: the frames the relay hands over, and the stream's wake-up.

    Hand-written rather than an asyncio.Queue: per frame and follower, the queue's
    get (a future, loop lookups, putter bookkeeping) and a timer for the catch-up
    were a fifth of the hive's CPU with 1,000 followers (bench/fanout.py)."""

    frames: collections.deque = field(default_factory=collections.deque)
    waiter: asyncio.Future | None = None
    #: Frames were dropped on a full inbox: read the log before waiting again.
    lagging: bool = False
    #: Quiet for a catch-up period: read the log before waiting again.
    catch_up: bool = False
    #: Catch-up sweeps this follower slept through with nothing handed over.
    quiet_sweeps: int = 0
    #: The hive is shutting down: end the stream at the next frame boundary.
    stopping: bool = False

    def put(self, frame: Frame) -> None:
        if len(self.frames) < FOLLOWER_BUFFER:
            self.frames.append(frame)
        else:
            self.lagging = True
        self.quiet_sweeps = 0
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        """Returns when there are frames, or a flag to act on."""
        while not (self.frames or self.catch_up or self.stopping):
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def take(self) -> list[Frame]:
        frames = list(self.frames)
        self.frames.clear()
        return frames
