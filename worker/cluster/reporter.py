"""Publishing a job's events and state from the worker.

Each event is appended to the job's replay log and published live in one round
trip (XADD + PUBLISH, pipelined). The log's TTL is set when the job starts and
again when it ends, not per event.

Tokens are not sent from here: the engine packs every job's token commands of one
decode step (``token_commands``: two per token) into one pipeline without waiting
for the replies (worker/engine/step_writer.py). Between ``started`` and its end, a job's
stream is written by the engine only, so every write stays in order.
"""

from __future__ import annotations

from collections.abc import Callable

import hiredis
import redis

from shared import events, job_record, keys, webhooks
from shared.clock import RedisClock
from shared.events import Event, Token
from shared.spec import FINAL_STATES, JobState


def _record_fields(state: JobState | None, fields: dict) -> dict[str, str]:
    if state is not None:
        fields[job_record.STATE] = state.value
    return {k: str(v) for k, v in fields.items()}


class JobReporter:
    def __init__(
        self,
        connection: redis.Redis,
        clock: RedisClock,
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
        self.clock = clock
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
        pipe.zadd(keys.RUNNING, {job_id: keys.lease_deadline(clock.now())})  # the lease, renewed by LeaseRenewal
        pipe.expire(keys.RUNNING, ttl_s)
        for key in unqueue:
            pipe.zrem(key, job_id)
        if fields:
            pipe.hset(keys.job(job_id), mapping=_record_fields(None, fields))
        last, cancel_flag = pipe.execute()[:2]
        # Go on from the last event in the log (the hive wrote `queued`).
        self.seq = events.seq_of(last[0][0]) if last else 0
        #: The job was cancelled before this worker took it.
        self.cancelled_before_start = bool(cancel_flag)

    def emit(self, event: Event, state: JobState | None = None, **fields) -> None:
        """Appends and publishes ``event``; ``state`` and ``fields`` update the
        record in the same round trip."""
        self.seq += 1
        data = event.to_json()
        pipe = self.redis.pipeline(transaction=False)
        if state is not None or fields:
            pipe.hset(keys.job(self.job_id), mapping=_record_fields(state, fields))
        # The webhook's start and end deliveries go out with the state that says so
        # (shared/webhooks.py); the script checks whether the job has a webhook.
        if state is JobState.running:
            webhooks.enqueue(pipe, self.job_id, webhooks.START, self.clock.now(), self.ttl_s)
        elif state in FINAL_STATES:
            webhooks.enqueue(pipe, self.job_id, webhooks.COMPLETED, self.clock.now(), self.ttl_s)
        pipe.xadd(self._log_key, {"e": event.type, "d": data}, id=events.stream_id(self.seq))
        pipe.publish(self._channel, events.live_message(self.seq, event.type, data))
        pipe.execute()

    def token_commands(self, token: Token) -> list[bytes]:
        """The two commands that append and publish ``token``, packed for the
        engine's step pipeline (``StepWriter``), which sends every job's tokens of
        one decode step together. (A job that has produced a token is not retried
        if its worker is lost: the hive reads that off the log, so no record write
        goes with the first token.) hiredis packs directly: redis-py's
        pack_commands wraps the same call in layers that cost 30 µs a token."""
        self.seq += 1
        data = token.to_json()
        return [
            hiredis.pack_command(("XADD", self._log_key, events.stream_id(self.seq), "e", token.type, "d", data)),
            hiredis.pack_command(("PUBLISH", self._channel, events.live_message(self.seq, token.type, data))),
        ]

    def update(self, state: JobState | None = None, **fields) -> None:
        self.redis.hset(keys.job(self.job_id), mapping=_record_fields(state, fields))

    def finish(self, final_event: Event, state: JobState, **fields) -> None:
        """The terminal event and the final state; the TTLs restart from now."""
        self._before_finish()
        # The record is final before the event is out: a client that reads the
        # status on `end` sees the job completed.
        self.emit(final_event, state, **{job_record.FINISHED_AT: self.clock.now(), **fields})
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(self._log_key, self.ttl_s)
        pipe.expire(keys.job(self.job_id), self.ttl_s)
        pipe.zrem(keys.RUNNING, self.job_id)  # give the lease back
        # The log shrinks about 10× for the job TTL it is kept (shared/events.py).
        self.redis.register_script(events.COMPACT_TOKENS)(keys=[self._log_key], client=pipe)
        pipe.execute()
