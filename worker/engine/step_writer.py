"""The engine's Redis writer: every token of one decode step, for the whole batch,
goes out as one pipeline on one connection (two commands per token: XADD to the
job's replay log, PUBLISH to its followers).

The step's commands are sent without waiting for Redis's replies; those are read
before the next step's send, while the model computes, so generation never stalls
on a round trip (on a busy machine a round trip waits for Redis to be scheduled:
bench/relay.py) and every write stays in order. A step after which jobs end reads
its replies at once: the jobs' threads then write their terminal events on other
connections, after their last tokens. redis-py has no send-now-read-later call,
hence its connection's own send and read.

Redis going away (a restart, a Sentinel failover) does not end the batch: the
writer waits for Redis to answer again, and the batch goes on from where it was.
The commands of the step (or two) in flight may be lost; the job's ids go on
increasing, so the hive shows the hole to followers as a ``gap`` event, and each
job's record still gets its whole output when it ends.

The writer holds its connection only while its batch runs: an engine whose batch
empties gives it back to the worker's pool (``release``). A worker keeps one engine
per loaded model, and with the default keep-alive a connection kept by each idle
one used the pool up at the 47th model (issue 19); running engines are at most one
per RQ slot, which is what the pool is sized for (worker/main.py).
"""

from __future__ import annotations

import logging

import redis

from shared.connections import REDIS_DOWN, wait_for_writes

log = logging.getLogger("worker.step_writer")

#: Redis's refusal of an XADD whose id is not past the log's last one.
STREAM_MOVED_ON = "equal or smaller than the target stream top item"


class StepWriter:
    def __init__(self, connection: redis.Redis):
        self._redis = connection
        self._connection: redis.Connection | None = None
        self._unread = 0
        #: Commands sent in all (bench/redis_cmds.py checks the per-token figure).
        self.commands_sent = 0
        #: Commands that may not have reached Redis, in outages ridden out.
        self.commands_lost = 0

    def send(self, commands: list[bytes]) -> None:
        """Sends one step's commands; the previous step's replies are read first."""
        if not commands:
            return
        self.flush()
        if self._connection is not None and self._went_stale():
            self._drop()
        try:
            if self._connection is None:
                self._connection = self._redis.connection_pool.get_connection()
            self._connection.send_packed_command(commands)
        except REDIS_DOWN as e:
            self._ride_out(e, len(commands))
            return
        except BaseException:
            self._drop()
            raise
        self._unread = len(commands)
        self.commands_sent += len(commands)

    def flush(self) -> None:
        """Reads the replies still unread: after it, everything sent is in Redis
        (a Redis error surfaces here)."""
        if self._connection is None:
            return
        refused: list[redis.ResponseError] = []
        try:
            while self._unread:
                try:
                    self._connection.read_response()
                except redis.ResponseError as e:
                    if STREAM_MOVED_ON not in str(e):
                        raise
                    refused.append(e)
                self._unread -= 1
        except REDIS_DOWN as e:
            self._ride_out(e, self._unread)
        except BaseException:
            self._drop()  # the replies after an error stay unread
            raise
        if refused:
            # A job a hive took over (its lease ran out: the worker was paused or cut off)
            # has an event after its tokens; its own lease renewal is about to take it out
            # of the batch. Only its writes are refused: the batch goes on.
            log.warning("%d token writes refused: %s (a job taken over by a hive)", len(refused), refused[0])

    def _ride_out(self, error: Exception, unconfirmed: int) -> None:
        """Waits until Redis answers again (a restart, a failover to a replica)."""
        self._drop()
        self.commands_lost += unconfirmed
        log.warning("lost Redis (%s): %d commands unconfirmed; the batch waits for Redis", error, unconfirmed)
        log.warning("Redis answers again after %.1f s; the batch goes on", wait_for_writes(self._redis))

    def _went_stale(self) -> bool:
        """Whether the kept connection, all its replies read, has something to read
        anyway: Redis closed it (restarted while this engine was idle, say). The pool's
        own check before it lends a connection, which a kept one skips; one poll."""
        try:
            return self._connection.can_read()
        except (*REDIS_DOWN, OSError):
            return True

    def _drop(self) -> None:
        connection, self._connection, self._unread = self._connection, None, 0
        if connection is not None:
            connection.disconnect()
            self._redis.connection_pool.release(connection)

    def release(self) -> None:
        """Reads what is unread, then gives the connection back to the pool, open, for
        the next burst to borrow (one pool round trip per burst, no reconnect)."""
        self.flush()
        connection, self._connection = self._connection, None
        if connection is not None:
            self._redis.connection_pool.release(connection)

    def close(self) -> None:
        if self._connection is not None:
            self._drop()
