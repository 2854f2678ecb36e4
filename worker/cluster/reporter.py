"""Publishing a job's events and state from the worker.

Each event is appended to the job's replay log and published live in one round
trip (XADD + PUBLISH, pipelined). The log's TTL is set when the job starts and
again when it ends, not per event.

Tokens are not sent from here: the engine packs every job's token commands of one
decode step (``token_commands``: two per token) into one pipeline without waiting
for the replies (worker/engine/step_writer.py). Between ``started`` and its end, a job's
stream is written by the engine only, so every write stays in order.

A job ends once. The end is written by one script that first gives the job's lease
back (ZREM from the running set); a hive's reaper claims a lost job by the same ZREM
(hive/jobs/reaper.py). So when a worker comes back after its lease ran out (SIGSTOP,
a partition) and finishes the job late, its end is dropped and the record stays as
the reaper wrote it: never both ``completed`` and ``WORKER_LOST``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import hiredis
import redis

from shared import events, job_record, keys, webhooks
from shared.clock import RedisClock
from shared.events import Event, Token, ToolCallDelta
from shared.spec import FINAL_STATES, JobState

log = logging.getLogger("worker.reporter")

# KEYS: the running set, the job's record, its webhook delivery, its log. ARGV: the
# webhook's eight (shared/webhooks.py: event, now, TTL, …, job id, …), then the
# channel, the event's stream id, type, JSON and live message, then the record's
# fields as name, value, … Nothing is written unless the lease is still held; the
# XADD goes first, so an id the log refuses leaves everything as it was.
_FINISH = webhooks.ENQUEUE_FUNCTION + """
if not redis.call('ZSCORE', KEYS[1], ARGV[6]) then return 0 end
redis.call('XADD', KEYS[4], ARGV[10], 'e', ARGV[11], 'd', ARGV[12])
redis.call('ZREM', KEYS[1], ARGV[6])
redis.call('HSET', KEYS[2], unpack(ARGV, 14))
enqueue_webhook(KEYS[2], KEYS[3], unpack(ARGV, 1, 8))
redis.call('PUBLISH', ARGV[9], ARGV[13])
redis.call('EXPIRE', KEYS[4], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


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
        pipe.hmget(keys.job(job_id), job_record.OWNER, job_record.PREFIXES)
        pipe.expire(self._log_key, ttl_s)
        pipe.zadd(keys.RUNNING, {job_id: keys.lease_deadline(clock.now())})  # the lease, renewed by LeaseRenewal
        pipe.expire(keys.RUNNING, ttl_s)
        for key in unqueue:
            pipe.zrem(key, job_id)
        if fields:
            pipe.hset(keys.job(job_id), mapping=_record_fields(None, fields))
        last, cancel_flag, (owner, prefixes) = pipe.execute()[:3]
        # Go on from the last event in the log (the hive wrote `queued`).
        self.seq = events.seq_of(last[0][0]) if last else 0
        #: The job was cancelled before this worker took it.
        self.cancelled_before_start = bool(cancel_flag)
        #: A digest of the API key that created the job ("" for none): its prefix-cache
        #: salt; and its prompt's prefix hashes (shared/prefix_affinity.py).
        self.owner = _text(owner)
        self.prefixes = [h for h in _text(prefixes).split(",") if h]

    def emit(self, event: Event, state: JobState | None = None, **fields) -> None:
        """Appends and publishes ``event``; ``state`` and ``fields`` update the
        record in the same round trip."""
        self.seq += 1
        data = event.to_json()
        pipe = self.redis.pipeline(transaction=False)
        if state is not None or fields:
            pipe.hset(keys.job(self.job_id), mapping=_record_fields(state, fields))
        # The webhook's start delivery goes out with the state that says so
        # (shared/webhooks.py; the end's: ``finish``).
        assert state not in FINAL_STATES, "a job ends through finish(), which checks its lease"
        if state is JobState.running:
            webhooks.enqueue(pipe, self.job_id, webhooks.START, self.clock.now(), self.ttl_s)
        pipe.xadd(self._log_key, {"e": event.type, "d": data}, id=events.stream_id(self.seq))
        pipe.publish(self._channel, events.live_message(self.seq, event.type, data))
        pipe.execute()

    def token_commands(self, token: Token | ToolCallDelta) -> list[bytes]:
        """The two commands that append and publish ``token`` (or a tool call's part), packed for the
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

    def finish(self, final_event: Event, state: JobState, **fields) -> bool:
        """The terminal event and the final state, with the lease given back, in one
        script; the TTLs restart from now. Whether it was written: not when a hive's
        reaper took the job over first (the record stays as the reaper wrote it)."""
        self._before_finish()
        self.seq += 1
        data = final_event.to_json()
        now = self.clock.now()
        webhook_keys, webhook_args = webhooks.enqueue_arguments(self.job_id, webhooks.COMPLETED, now, self.ttl_s)
        record = _record_fields(state, {job_record.FINISHED_AT: now, **fields})
        written = self.redis.register_script(_FINISH)(
            keys=[keys.RUNNING, webhook_keys[0], webhook_keys[1], self._log_key],
            args=[
                *webhook_args,
                self._channel,
                events.stream_id(self.seq),
                final_event.type,
                data,
                events.live_message(self.seq, final_event.type, data),
                *[item for pair in record.items() for item in pair],
            ],
        )
        if not written:
            log.warning("job %s: its %s came too late: a hive took the job over when its lease ran out; the record stays as that hive wrote it",
                        self.job_id, state.value)
            return False
        # The log shrinks about 10× for the job TTL it is kept (shared/events.py).
        self.redis.register_script(events.COMPACT_TOKENS)(keys=[self._log_key])
        return True


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""
