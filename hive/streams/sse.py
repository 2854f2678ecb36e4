"""The SSE response of job streams: sse-starlette's, with its stall bound kept per
stream rather than per send.

A follower that stops reading (a frozen tab, a dead peer behind a proxy) would hold
its stream, buffers and subscription forever: the server's send waits for the
socket to drain. sse-starlette bounds that with ``send_timeout``, an anyio cancel
scope around every send; with 1,000 followers that scope and its task lookups were
about a quarter of the hive's CPU (docs/benchmarks.md, Fan-out). Here a send only
notes when it began, and one watchdog per hive process cancels the streams whose
send has waited longer than the bound. The client can resume with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("hive.sse")

#: A follower whose socket accepts nothing for this long is dropped.
SEND_TIMEOUT_S = 60.0

#: On shutdown, how long streams are given to send their farewell before they are closed.
SHUTDOWN_GRACE_S = 2.0


class StallWatchdog:
    """Cancels the job streams of this process whose send has waited too long."""

    def __init__(self, bound_s: float = SEND_TIMEOUT_S, every_s: float = 1.0):
        self.bound_s = bound_s
        self.every_s = every_s
        self.streams: set[JobEventStream] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="hive-stall-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.cancel_stalled(time.monotonic())

    def cancel_stalled(self, now: float) -> int:
        stalled = [s for s in self.streams if s.sending_since and now - s.sending_since > self.bound_s]
        for stream in stalled:
            log.info("dropping a follower that read nothing for %.0f s", now - stream.sending_since)
            stream.scope.cancel()
        return len(stalled)


class JobEventStream(EventSourceResponse):
    """An ``EventSourceResponse`` whose sends the ``watchdog`` bounds (do not pass
    ``send_timeout``)."""

    def __init__(self, *args, watchdog: StallWatchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self.watchdog = watchdog
        #: time.monotonic() when the send in progress began; 0.0 between sends.
        self.sending_since = 0.0
        self.scope = anyio.CancelScope()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        self.sending_since = time.monotonic()
        try:
            await send(message)
        finally:
            self.sending_since = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.watchdog.streams.add(self)
        try:
            with self.scope:
                await super().__call__(scope, receive, send)
        finally:
            self.watchdog.streams.discard(self)
