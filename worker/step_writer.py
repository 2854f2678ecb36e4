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
"""

from __future__ import annotations

import redis


class StepWriter:
    def __init__(self, connection: redis.Redis):
        self._redis = connection
        self._connection: redis.Connection | None = None
        self._unread = 0
        #: Commands sent in all (bench/redis_cmds.py checks the per-token figure).
        self.commands_sent = 0

    def send(self, commands: list[bytes]) -> None:
        """Sends one step's commands; the previous step's replies are read first."""
        if not commands:
            return
        self.flush()
        if self._connection is not None and self._went_stale():
            self._drop()
        if self._connection is None:
            self._connection = self._redis.connection_pool.get_connection()
        try:
            self._connection.send_packed_command(commands)
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
        try:
            while self._unread:
                self._connection.read_response()
                self._unread -= 1
        except BaseException:
            self._drop()  # the replies after an error stay unread
            raise

    def _went_stale(self) -> bool:
        """Whether the kept connection, all its replies read, has something to read
        anyway: Redis closed it (restarted while this engine was idle, say). The pool's
        own check before it lends a connection, which a kept one skips; one poll."""
        try:
            return self._connection.can_read()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return True

    def _drop(self) -> None:
        connection, self._connection, self._unread = self._connection, None, 0
        connection.disconnect()
        self._redis.connection_pool.release(connection)

    def close(self) -> None:
        if self._connection is not None:
            self._drop()
