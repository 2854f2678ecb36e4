"""Jobs on the hive's side of Redis once submitted (hive/jobs/submit.py): status,
cancels, retries after a lost worker, queue-wait timeouts, queue positions, and
jobs stranded on a busy or dead worker's own queue or popped for a dead one, which
the reaper hands on to the front of the shared queue (hive/jobs/stranded.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from hive.jobs.stranded import StrandedJobs
from hive.jobs.submit import Admission, Submitted, Submitter
from hive.webhooks.guard import resolve as resolve_webhook
from shared import events, job_record, keys, webhooks
from shared.clock import RedisClock
from shared.events import Error, Queued, Retry, Token
from shared.settings import Settings
from shared.spec import FINAL_STATES, InferenceRequest, JobState, PullRequest

log = logging.getLogger("hive.jobs")


class JobNotFound(Exception):
    pass


class JobFinished(Exception):
    """The job already reached a final state (completed, failed, cancelled)."""

    def __init__(self, state: str):
        super().__init__(f"the job is already {state}")
        self.state = state

#: Queue positions are kept up to date for this many waiting jobs (those further
#: back hear of theirs once they move up): every pickup shifts them all.
POSITION_UPDATES = 100

# Appends a `queued` event with the job's new position, atomically with the check
# that the job still waits: a worker that takes it reads the log's last id and
# leaves the waiting set in one MULTI (worker/cluster/reporter.py), so the two never write
# the same id. The live message repeats shared.events.live_message's format.
_UPDATE_POSITION = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then return 0 end
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local seq = 1
if #last > 0 then seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
redis.call('XADD', KEYS[3], seq .. '-0', 'e', 'queued', 'd', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('PUBLISH', KEYS[4], seq .. '\\n' .. 'queued' .. '\\n' .. ARGV[4])
return 1
"""


class JobService:
    def __init__(
        self,
        settings: Settings,
        connection: aioredis.Redis,
        sync_connection: redis.Redis,
        clock: RedisClock,
        on_end: Callable[[str, str, str], None] = lambda kind, outcome, code: None,
    ):
        """``on_end(kind, outcome, code)``: a job the hive itself ended (metrics).
        Submits run on the event loop (``connection``); the reaper's sweeps, in the
        thread pool, use ``sync_connection``, as RQ is synchronous. ``clock``: every
        time written or compared (Redis's: workers and other hives write them too)."""
        self.settings = settings
        self.clock = clock
        self.on_end = on_end
        self.redis = connection
        self.queue = Queue(settings.queue, connection=sync_connection, serializer=JSONSerializer)
        self._submitter = Submitter(settings, connection, self.queue.connection, clock)
        self._update_position = sync_connection.register_script(_UPDATE_POSITION)
        self._stranded = StrandedJobs(sync_connection, settings.queue, clock)

    async def submit(self, request: InferenceRequest | PullRequest, owner: str, admission: Admission = Admission()) -> Submitted:
        """See hive/jobs/submit.py. A webhook whose host does not resolve to an address
        the hive calls is refused first (hive/webhooks/guard.py: WebhookRefused), so
        nothing of the job is written."""
        if getattr(request, "webhook", None):
            await resolve_webhook(request.webhook, self.settings.webhook_allow_private)
        return await self._submitter.enqueue(request, owner, admission)

    async def jobs_by_key(self, owners: list[str]) -> dict[str, dict[str, int]]:
        """Per API key (its id), its jobs waiting and running, read off its set of
        jobs in flight (hive/jobs/submit.py) and each job's state."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.zrange(keys.key_in_flight(owner), 0, -1)
            in_flight = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_ids in in_flight:
                for job_id in job_ids:
                    pipe.hget(keys.job(job_id), job_record.STATE)
            states = iter(await pipe.execute())
        counts = {}
        for owner, job_ids in zip(owners, in_flight):
            waiting = running = 0
            for _ in job_ids:
                state = next(states)
                if state == JobState.queued.value:
                    waiting += 1
                elif state is not None and JobState(state) not in FINAL_STATES:
                    running += 1
            counts[owner] = {"waiting": waiting, "running": running}
        return counts

    async def idempotency_answered(self, owner: str, key: str, response: str) -> None:
        await self._submitter.accepted(owner, key, response)

    def _queue(self, name: str) -> Queue:
        return Queue(name, connection=self.queue.connection, serializer=JSONSerializer)

    def _enqueue_rq(self, pipe, cluster_queue: str, rq_queue: Queue, job_id: str, rq_id: str, spec: dict, kind: str) -> None:
        """Requeues a retried job (the reaper's path; submits use the script).
        ``cluster_queue`` counts the job for depth limits and queue-wait timeouts;
        ``rq_queue`` carries it."""
        ttl = self.settings.job_ttl_s
        for key in (keys.queued(cluster_queue), keys.queued_for_model(cluster_queue, spec["model"])):
            pipe.zadd(key, {job_id: self.clock.now()})
            pipe.expire(key, ttl)
        rq_queue.enqueue_call(
            job_record.TASKS[kind],
            args=(job_id, spec),
            job_id=rq_id,
            timeout=self.settings.job_timeout_s,
            result_ttl=0,
            failure_ttl=self.settings.job_ttl_s,
            pipeline=pipe,
        )

    def _append_event(self, job_id: str, event, fields: dict[str, str], then=None) -> None:
        """Appends an event the hive itself writes (a cancel while queued, a retry, a
        lost worker) after the job's last one, with ``fields`` for its record, in
        one MULTI; ``then(pipe)`` adds more commands to it. Only for jobs no worker
        is writing to."""
        connection = self.queue.connection
        last = connection.xrevrange(keys.job_events(job_id), count=1)
        seq = events.seq_of(last[0][0]) + 1 if last else 1
        data = event.to_json()
        with connection.pipeline() as pipe:
            pipe.multi()
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.xadd(keys.job_events(job_id), {"e": event.type, "d": data}, id=events.stream_id(seq))
            pipe.publish(keys.job_channel(job_id), events.live_message(seq, event.type, data))
            if then is not None:
                then(pipe)
            pipe.execute()

    def _end_here(self, job_id: str, state: JobState, error: Error, kind: str) -> None:
        ttl = self.settings.job_ttl_s
        now = self.clock.now()

        def expire(pipe) -> None:
            pipe.expire(keys.job(job_id), ttl)
            pipe.expire(keys.job_events(job_id), ttl)
            # In the MULTI that ends the job: its webhook's last delivery (shared/webhooks.py).
            webhooks.enqueue(pipe, job_id, webhooks.COMPLETED, now, ttl)

        fields = {
            job_record.STATE: state.value,
            job_record.FINISHED_AT: str(now),
            job_record.ERROR_CODE: error.code,
            job_record.ERROR_MESSAGE: error.message,
        }
        self._append_event(job_id, error, fields, expire)
        self.on_end(kind, state.value, error.code)

    def worker_lost(self, job_id: str) -> str:
        """The job's worker stopped renewing its lease: retry the job once if it had
        produced no token yet, else end it with WORKER_LOST. Returns what was done."""
        record = {k.decode(): v.decode() for k, v in self.queue.connection.hgetall(keys.job(job_id)).items()}
        if not record or record.get(job_record.STATE) in {s.value for s in FINAL_STATES}:
            return "nothing"
        worker = record.get(job_record.WORKER) or "?"
        attempt = int(record.get(job_record.ATTEMPT) or 1)
        # Whether it produced a token: then its log ends with one (a job ends with
        # `end` or `error`, and a retry happens only before any token), so the
        # worker's token path needs no record write of its own.
        last = self.queue.connection.xrevrange(keys.job_events(job_id), count=1)
        had_token = bool(last) and last[0][1].get(b"e") == Token.type.encode()
        if not had_token and attempt < job_record.MAX_ATTEMPTS:
            attempt += 1
            rq_id = f"{job_id}-{attempt}"  # RQ ids allow letters, digits, _ and -
            spec = json.loads(record[job_record.SPEC])
            # Back on the job's own queue, whichever hive's reaper got here first.
            queue = self._queue(record.get(job_record.QUEUE) or self.queue.name)
            fields = {
                job_record.STATE: JobState.queued.value,
                job_record.ATTEMPT: str(attempt),
                job_record.RQ_ID: rq_id,
                job_record.RQ_QUEUE: queue.name,
                job_record.WORKER: "",
            }
            self._append_event(
                job_id,
                Retry(attempt, f"worker {worker} lost"),
                fields,
                lambda pipe: self._enqueue_rq(pipe, queue.name, queue, job_id, rq_id, spec, record.get(job_record.KIND) or "inference"),
            )
            return "retried"
        phase = "after its first token" if had_token else f"on attempt {attempt}"
        self._end_here(job_id, JobState.failed, Error("WORKER_LOST", f"worker {worker} stopped responding {phase}"), record.get(job_record.KIND) or "inference")
        return "failed"

    async def record(self, job_id: str) -> dict[str, str] | None:
        record = await self.redis.hgetall(keys.job(job_id))
        return record or None

    async def cancel(self, job_id: str) -> str:
        """Cancels the job in whatever phase it is; returns ``cancelled`` when it was
        still queued (ended here), ``cancelling`` when its worker will end it."""
        record = await self.record(job_id)
        if record is None:
            raise JobNotFound(job_id)
        if record.get(job_record.STATE) in {s.value for s in FINAL_STATES}:
            raise JobFinished(record[job_record.STATE])
        return await run_in_threadpool(self._cancel, job_id, record)

    def _cancel(self, job_id: str, record: dict[str, str]) -> str:
        with self.queue.connection.pipeline(transaction=False) as pipe:
            # Flag first, then tell the workers: one taking the job now reads the flag.
            pipe.set(keys.job_cancel(job_id), "1", ex=self.settings.job_ttl_s)
            pipe.publish(keys.CANCEL_CHANNEL, job_id)
            pipe.execute()
        if not self._take_off_queue(job_id, record):
            return "cancelling"
        # Taken off the queue: no worker will see it, so its stream ends here.
        self._end_here(job_id, JobState.cancelled, Error("CANCELLED", "cancelled by the client while queued"), record.get(job_record.KIND) or "inference")
        return JobState.cancelled.value

    def _take_off_queue(self, job_id: str, record: dict[str, str]) -> bool:
        """Whether the job was still waiting on its queue (then no worker will ever take it)."""
        rq_id = record.get(job_record.RQ_ID) or job_id
        queue_name = record.get(job_record.QUEUE) or self.queue.name
        rq_queue = record.get(job_record.RQ_QUEUE) or queue_name
        with self.queue.connection.pipeline(transaction=False) as pipe:
            pipe.lrem(self._queue(rq_queue).key, 0, rq_id)
            pipe.zrem(keys.queued(queue_name), job_id)
            pipe.zrem(keys.queued_for_model(queue_name, record.get(job_record.MODEL, "")), job_id)
            pipe.zrem(keys.fair(queue_name), job_id)
            removed = pipe.execute()[0]
        if removed:
            self.queue.connection.delete(Job.key_for(rq_id))
        return bool(removed)

    def expire_waiting(self) -> int:
        """Ends with TIMEOUT the jobs that waited longer than max_queue_wait_s."""
        connection = self.queue.connection
        cutoff = self.clock.now() - self.settings.max_queue_wait_s
        ended = 0
        for raw_id in connection.zrangebyscore(keys.queued(self.queue.name), 0, cutoff):
            job_id = raw_id.decode()
            fields = (job_record.RQ_ID, job_record.MODEL, job_record.QUEUE, job_record.RQ_QUEUE, job_record.KIND)
            record = {k: v.decode() for k, v in zip(fields, connection.hmget(keys.job(job_id), *fields)) if v}
            if self._take_off_queue(job_id, record):
                message = f"waited longer than {self.settings.max_queue_wait_s:g} s in the queue"
                self._end_here(job_id, JobState.failed, Error("TIMEOUT", message), record.get(job_record.KIND) or "inference")
                ended += 1
        return ended

    def hand_on_stranded(self) -> int:
        """Moves the jobs waiting where no worker will take them soon to the front of
        the shared queue (hive/jobs/stranded.py). Returns how many moved."""
        return self._stranded.hand_on()

    def update_positions(self) -> int:
        """Tells the first POSITION_UPDATES waiting jobs their position when it
        changed (a ``queued`` event). Returns how many were told."""
        told = 0
        # In fair-share order (hive/jobs/submit.py): the shared queue's own order.
        waiting = self.queue.connection.zrange(keys.fair(self.queue.name), 0, POSITION_UPDATES - 1)
        for position, raw_id in enumerate(waiting, start=1):
            job_id = raw_id.decode()
            told += self._update_position(
                keys=[keys.fair(self.queue.name), keys.job(job_id), keys.job_events(job_id), keys.job_channel(job_id)],
                args=[job_id, str(position), job_record.POSITION, Queued(position).to_json()],
            )
        return told
