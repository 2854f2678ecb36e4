"""Submitting jobs and reading their status, on the hive's side of Redis.

Submission writes the job record, the first event (``queued``) and the RQ job in
one MULTI, so a job is either wholly accepted or not at all.
"""

from __future__ import annotations

import time
import uuid

import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from shared import events, jobs, keys
from shared.events import Error, Queued
from shared.settings import Settings
from shared.spec import FINAL_STATES, InferenceRequest, JobState


class JobNotFound(Exception):
    pass


class JobFinished(Exception):
    """The job already reached a final state (completed, failed, cancelled)."""

    def __init__(self, state: str):
        super().__init__(f"the job is already {state}")
        self.state = state

class JobService:
    def __init__(self, settings: Settings, connection: aioredis.Redis, sync_connection: redis.Redis):
        self.settings = settings
        self.redis = connection
        # RQ is synchronous: enqueues run in the thread pool on their own connection pool.
        self.queue = Queue(settings.queue, connection=sync_connection, serializer=JSONSerializer)

    async def submit(self, request: InferenceRequest) -> tuple[str, int]:
        """Returns (job id, queue position)."""
        job_id = uuid.uuid4().hex
        position = await run_in_threadpool(self._enqueue, job_id, request)
        return job_id, position

    def _enqueue(self, job_id: str, request: InferenceRequest) -> int:
        ttl = self.settings.job_ttl_s
        spec = request.model_dump(mode="json")
        position = self.queue.count + 1
        queued = Queued(position)
        with self.queue.connection.pipeline() as pipe:
            pipe.multi()  # RQ expects a pipeline already in MULTI when handed one
            pipe.hset(
                keys.job(job_id),
                mapping={
                    jobs.SPEC: request.model_dump_json(),
                    jobs.STATE: JobState.queued.value,
                    jobs.MODEL: request.model,
                    jobs.REVISION: request.revision or "",
                    jobs.CREATED_AT: str(time.time()),
                },
            )
            pipe.expire(keys.job(job_id), ttl)
            pipe.xadd(keys.job_events(job_id), {"e": queued.type, "d": queued.to_json()}, id=events.stream_id(1))
            pipe.expire(keys.job_events(job_id), ttl)
            self.queue.enqueue_call(
                jobs.RUN_INFERENCE,
                args=(job_id, spec),
                job_id=job_id,
                timeout=self.settings.job_timeout_s,
                result_ttl=0,
                failure_ttl=ttl,
                pipeline=pipe,
            )
            pipe.execute()
        return position

    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(keys.job(job_id)))

    async def record(self, job_id: str) -> dict[str, str] | None:
        record = await self.redis.hgetall(keys.job(job_id))
        return record or None

    async def status(self, job_id: str) -> dict | None:
        record = await self.record(job_id)
        return jobs.status_view(job_id, record) if record else None

    async def cancel(self, job_id: str) -> str:
        """Cancels the job in whatever phase it is; returns ``cancelled`` when it was
        still queued (ended here), ``cancelling`` when its worker will end it."""
        record = await self.record(job_id)
        if record is None:
            raise JobNotFound(job_id)
        if record.get(jobs.STATE) in {s.value for s in FINAL_STATES}:
            raise JobFinished(record[jobs.STATE])
        return await run_in_threadpool(self._cancel, job_id)

    def _cancel(self, job_id: str) -> str:
        connection = self.queue.connection
        ttl = self.settings.job_ttl_s
        with connection.pipeline(transaction=False) as pipe:
            # Flag first, then tell the workers: one taking the job now reads the flag.
            pipe.set(keys.job_cancel(job_id), "1", ex=ttl)
            pipe.publish(keys.CANCEL_CHANNEL, job_id)
            pipe.lrem(self.queue.key, 0, job_id)
            removed = pipe.execute()[2]
        if not removed:
            return "cancelling"
        # Taken off the queue: no worker will see it, so its stream ends here.
        last = connection.xrevrange(keys.job_events(job_id), count=1)
        seq = events.seq_of(last[0][0]) + 1 if last else 1
        error = Error("CANCELLED", "cancelled by the client while queued")
        with connection.pipeline(transaction=False) as pipe:
            pipe.hset(
                keys.job(job_id),
                mapping={
                    jobs.STATE: JobState.cancelled.value,
                    jobs.FINISHED_AT: str(time.time()),
                    jobs.ERROR_CODE: error.code,
                    jobs.ERROR_MESSAGE: error.message,
                },
            )
            pipe.xadd(keys.job_events(job_id), {"e": error.type, "d": error.to_json()}, id=events.stream_id(seq))
            pipe.publish(keys.job_channel(job_id), events.live_message(seq, error.type, error.to_json()))
            pipe.delete(Job.key_for(job_id))
            pipe.execute()
        return JobState.cancelled.value
