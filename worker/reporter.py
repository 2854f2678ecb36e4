"""Publishing a job's events and state from the worker.

Each event is appended to the job's replay log and published live in one round
trip (XADD + PUBLISH, pipelined: two commands per token). The log's TTL is set
when the job starts and again when it ends, not per event.

Tokens after the first do not wait for that round trip: their commands are sent,
and Redis's replies read before the reporter's next write, while the model
computes the next token. Generation never stalls on Redis (on a busy machine, a
round trip waits for Redis to be scheduled: bench/relay.py), the event still
leaves the moment it exists, and every write stays in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import hiredis
import redis

from shared import events, jobs, keys
from shared.events import Event, Token
from shared.spec import JobState


def _record_fields(state: JobState | None, fields: dict) -> dict[str, str]:
    if state is not None:
        fields[jobs.STATE] = state.value
    return {k: str(v) for k, v in fields.items()}


class JobReporter:
    def __init__(
        self,
        connection: redis.Redis,
        job_id: str,
        ttl_s: int,
        unqueue: tuple[str, ...] = (),
        before_finish: Callable[[], None] = lambda: None,
        **fields,
    ):
        """Takes the job (``fields`` go to its record; it leaves the ``unqueue``
        sorted sets of waiting jobs) in one round trip. ``before_finish`` runs just
        before the terminal event goes out."""
        self.redis = connection
        self._before_finish = before_finish
        self.job_id = job_id
        self.ttl_s = ttl_s
        self._log_key = keys.job_events(job_id)
        self._channel = keys.job_channel(job_id)
        # One MULTI: the hive appends queue-position events only while the job is in
        # the waiting set, so between reading the last id and leaving the set nothing
        # else may write to the log.
        pipe = connection.pipeline(transaction=True)
        pipe.xrevrange(self._log_key, count=1)
        pipe.exists(keys.job_cancel(job_id))
        pipe.expire(self._log_key, ttl_s)
        pipe.zadd(keys.RUNNING, {job_id: keys.lease_deadline()})  # the lease, renewed by JobLease
        pipe.expire(keys.RUNNING, ttl_s)
        for key in unqueue:
            pipe.zrem(key, job_id)
        if fields:
            pipe.hset(keys.job(job_id), mapping=_record_fields(None, fields))
        last, cancel_flag = pipe.execute()[:2]
        # Go on from the last event in the log (the hive wrote `queued`).
        self.seq = events.seq_of(last[0][0]) if last else 0
        #: The connection emit_token writes on, and how many of its replies are unread.
        self._tokens: redis.Connection | None = None
        self._unread = 0
        #: The job was cancelled before this worker took it.
        self.cancelled_before_start = bool(cancel_flag)

    def emit(self, event: Event, state: JobState | None = None, **fields) -> None:
        """Appends and publishes ``event``; ``state`` and ``fields`` update the
        record in the same round trip."""
        self._settle()
        self.seq += 1
        data = event.to_json()
        pipe = self.redis.pipeline(transaction=False)
        if state is not None or fields:
            pipe.hset(keys.job(self.job_id), mapping=_record_fields(state, fields))
        pipe.xadd(self._log_key, {"e": event.type, "d": data}, id=events.stream_id(self.seq))
        pipe.publish(self._channel, events.live_message(self.seq, event.type, data))
        pipe.execute()

    def emit_token(self, token: Token) -> None:
        """Appends and publishes ``token`` without waiting for Redis's replies (read
        at the next write). redis-py has no such call, hence its connection's own
        send and read; a Redis error surfaces at the next write."""
        connection = self._token_connection()
        self.seq += 1
        data = token.to_json()
        try:
            # hiredis packs directly: redis-py's pack_commands wraps the same call in
            # layers that cost 30 µs a token, 1.5% of a tiny model's token time.
            connection.send_packed_command(
                [
                    hiredis.pack_command(("XADD", self._log_key, events.stream_id(self.seq), "e", token.type, "d", data)),
                    hiredis.pack_command(("PUBLISH", self._channel, events.live_message(self.seq, token.type, data))),
                ]
            )
        except BaseException:
            self._drop_token_connection()
            raise
        self._unread = 2

    def _token_connection(self) -> redis.Connection:
        """The connection tokens go out on, held from the first token to the next
        other write (a pool checkout per token cost more than the send itself),
        with the previous token's replies read."""
        if self._tokens is None:
            self._tokens = self.redis.connection_pool.get_connection()
        else:
            self._read_replies()
        return self._tokens

    def _read_replies(self) -> None:
        try:
            while self._unread:
                self._tokens.read_response()
                self._unread -= 1
        except BaseException:
            self._drop_token_connection()  # the replies after an error stay unread
            raise

    def _settle(self) -> None:
        """Before any other write: the tokens' replies are read, so the write lands
        after them, and their connection goes back to the pool."""
        if self._tokens is None:
            return
        self._read_replies()
        self.redis.connection_pool.release(self._tokens)
        self._tokens = None

    def _drop_token_connection(self) -> None:
        connection, self._tokens, self._unread = self._tokens, None, 0
        connection.disconnect()
        self.redis.connection_pool.release(connection)

    def close(self) -> None:
        """Gives back the tokens' connection of a job that ended without its
        terminal event; replies still unread are dropped with the connection."""
        if self._tokens is not None:
            self._drop_token_connection()

    def update(self, state: JobState | None = None, **fields) -> None:
        self._settle()
        self.redis.hset(keys.job(self.job_id), mapping=_record_fields(state, fields))

    def finish(self, final_event: Event, state: JobState, **fields) -> None:
        """The terminal event and the final state; the TTLs restart from now."""
        self._before_finish()
        # The record is final before the event is out: a client that reads the
        # status on `end` sees the job completed.
        self.emit(final_event, state, **{jobs.FINISHED_AT: time.time(), **fields})  # settles first
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(self._log_key, self.ttl_s)
        pipe.expire(keys.job(self.job_id), self.ttl_s)
        pipe.zrem(keys.RUNNING, self.job_id)  # give the lease back
        pipe.execute()
