"""Jobs that wait where no worker will take them soon, handed on by the hive's reaper
(hive/jobs/reaper.py) to the front of the shared queue within a second or two:

- jobs on the own queue of a worker that is dead, or whose slots are all busy;
- jobs RQ's pop took off a queue for a worker that never took them on: it died
  between the pop and the job's first write, or its host was cut off.

A host cut off from Redis (a partition, not a crash) cannot close its connections,
so Redis keeps its free slots' BLPOPs (on its own queue and on the shared one)
waiting, and hands them the next jobs pushed there: the replies go nowhere and each
job would wait, ``queued`` and on no queue, until its queue-wait timeout. Warm
routing sends a job to such a worker while its heartbeat is still fresh, and the
shared queue feeds its slots as readily as a live worker's. So when a worker is
found dead, first its waiting pops are released (``keys.NO_JOB``), so that it can
take nothing more; then every waiting job on no queue is noted (``keys.popped``),
and those still so a moment later (a live worker takes a job within milliseconds of
its pop) go back under a new RQ id: should the cut-off worker's link come back with
Redis's old reply, RQ finds no such job and skips it.
"""

from __future__ import annotations

import logging
import secrets

import redis
from rq import Queue
from rq.job import Job, JobStatus

from shared import job_record, keys
from shared.clock import RedisClock
from shared.spec import JobState

log = logging.getLogger("hive.jobs")

#: A job popped and still not taken on after this long was popped for a worker that
#: is gone: a live one writes its take within milliseconds of RQ's pop.
POPPED_FOR_S = 1.0
#: NO_JOB ids pushed at a time to release a dead worker's waiting pops; again while
#: every one was taken.
RELEASE_BATCH = 64
#: Enough rounds for --max-batch's bound (1024 slots, hive/cli.py).
RELEASE_ROUNDS = 1024 // RELEASE_BATCH + 1

# Puts back a job noted as popped if it still waits by its record, on no queue, and
# RQ never started it: under a new RQ id (RQ's hash renamed), at the front of the
# shared queue; the claim on the worker it was routed to goes with it.
# KEYS: the noted set, the job's record, the waiting set. ARGV: job id, new RQ id,
# the shared queue's name, RQ's queue-key and job-key prefixes, the own queues'
# name prefix, the claims' key prefix, the record's state, RQ id and RQ queue field
# names, the state "queued" and RQ's status "queued".
_PUT_BACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
local record = redis.call('HMGET', KEYS[2], ARGV[8], ARGV[9], ARGV[10])
if record[1] ~= ARGV[11] or not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
local rq_id, rq_queue = record[2] or ARGV[1], record[3] or ARGV[3]
if redis.call('LPOS', ARGV[4] .. rq_queue, rq_id) then return 0 end
if redis.call('HGET', ARGV[5] .. rq_id, 'status') ~= ARGV[12] then return 0 end
redis.call('RENAME', ARGV[5] .. rq_id, ARGV[5] .. ARGV[2])
redis.call('HSET', ARGV[5] .. ARGV[2], 'origin', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[9], ARGV[2], ARGV[10], ARGV[3])
redis.call('LPUSH', ARGV[4] .. ARGV[3], ARGV[2])
if string.sub(rq_queue, 1, #ARGV[6]) == ARGV[6] then
  local claims = ARGV[7] .. string.sub(rq_queue, #ARGV[6] + 1)
  if tonumber(redis.call('GET', claims) or '0') > 0 then redis.call('DECR', claims) end
end
return 1
"""


class StrandedJobs:
    """The reaper's sweep of stranded jobs (``hand_on``, once a period, on every hive):
    what it writes is safe whichever hive gets there first."""

    def __init__(self, connection: redis.Redis, queue: str, clock: RedisClock):
        """``queue``: the cluster's shared queue; ``clock``: Redis's, as the heartbeats'."""
        self.redis = connection
        self.queue = queue
        self.clock = clock
        self._put_back = connection.register_script(_PUT_BACK)

    def _key(self, queue: str) -> str:
        return Queue.redis_queue_namespace_prefix + queue

    def hand_on(self) -> int:
        """Moves the jobs stranded on a worker's own queue or popped for a worker
        that is gone to the front of the shared queue, oldest first; drops dead
        workers from the list. Returns how many moved.

        Goes by RQ's list of queues, not by the live workers: a job routed to a
        worker in the instant it was declared dead is still found."""
        connection = self.redis
        shared = self.queue
        now = self.clock.now()
        beats = {name.decode(): beat for name, beat in connection.zrange(keys.workers(shared), 0, -1, withscores=True)}
        found_dead = False
        for name, beat in beats.items():
            # The hive whose ZREM wins deals with the worker's death, once.
            if beat < now - keys.WORKER_DEAD_AFTER_S and connection.zrem(keys.workers(shared), name):
                self._release_pops(name)
                found_dead = True
        if found_dead:
            self._note_popped(now)  # whatever it popped and never took: nothing more now
        prefix = self._key(keys.worker_queue(shared, ""))
        moved = 0
        for queue_key in connection.smembers(Queue.redis_queues_keys):
            queue_key = queue_key.decode()
            if not queue_key.startswith(prefix):
                continue
            name = queue_key.removeprefix(prefix)
            dead = beats.get(name, 0.0) < now - keys.WORKER_DEAD_AFTER_S
            capacity, running = connection.hmget(keys.worker(name), "capacity", "running")
            if not dead and (capacity is None or int(running or 0) < int(capacity)):
                continue  # a free slot takes them in a moment
            # From the back of its queue to the front of the shared one: order kept.
            while rq_id := connection.lmove(queue_key, self._key(shared), "RIGHT", "LEFT"):
                rq_id = rq_id.decode()
                with connection.pipeline(transaction=False) as pipe:
                    pipe.decr(keys.worker_claims(name))  # it will not take this one
                    pipe.hset(Job.key_for(rq_id), "origin", shared)
                    pipe.hset(keys.job(rq_id.split("-")[0]), job_record.RQ_QUEUE, shared)
                    pipe.execute()
                moved += 1
            if dead:
                connection.srem(Queue.redis_queues_keys, queue_key)
        return moved + self._put_back_popped(now)

    def _release_pops(self, name: str) -> None:
        """Ends the BLPOPs the dead worker's slots left waiting in Redis (a host cut
        off, not crashed): NO_JOB ids pushed onto its own queue, where each waiting
        pop takes one (Redis serves them as the push ends), and those none took
        removed; again while every one was taken."""
        own = self._key(keys.worker_queue(self.queue, name))
        released = 0
        for _ in range(RELEASE_ROUNDS):
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(own, *[keys.NO_JOB] * RELEASE_BATCH)
                pipe.lrem(own, 0, keys.NO_JOB)
                untaken = pipe.execute()[1]
            released += RELEASE_BATCH - untaken
            if untaken:
                break
        if released:
            log.warning("worker %s is silent, yet %d of its slots still waited on their queues in Redis (its host cut off?): released", name, released)

    def _note_popped(self, now: float) -> None:
        """Notes the jobs still waiting by their record that are on no RQ queue: RQ's
        pop took them, for a worker that is gone, or for a live one that is writing
        its take right now (done when they are looked at again)."""
        connection = self.redis
        waiting = [raw.decode() for raw in connection.zrange(keys.queued(self.queue), 0, -1)]
        with connection.pipeline(transaction=False) as pipe:
            for job_id in waiting:
                pipe.hmget(keys.job(job_id), job_record.STATE, job_record.RQ_ID, job_record.RQ_QUEUE)
            records = pipe.execute()
        queued = [
            (job_id, (rq_id or job_id.encode()).decode(), (rq_queue or self.queue.encode()).decode())
            for job_id, (state, rq_id, rq_queue) in zip(waiting, records)
            if state == JobState.queued.value.encode()
        ]
        names = sorted({rq_queue for _, _, rq_queue in queued})
        with connection.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.lrange(self._key(name), 0, -1)
            on_queue = {name: {rq_id.decode() for rq_id in ids} for name, ids in zip(names, pipe.execute())}
        popped = {job_id: now for job_id, rq_id, rq_queue in queued if rq_id not in on_queue[rq_queue]}
        if popped:
            connection.zadd(keys.popped(self.queue), popped, nx=True)
            connection.expire(keys.popped(self.queue), keys.JOB_TTL_S)

    def _put_back_popped(self, now: float) -> int:
        """Puts back the noted jobs still on no queue POPPED_FOR_S after they were noted."""
        moved = 0
        for raw_id in self.redis.zrangebyscore(keys.popped(self.queue), "-inf", now - POPPED_FOR_S):
            job_id = raw_id.decode()
            rq_id = f"{job_id}-{secrets.token_hex(4)}"  # <job id>-<…>, as the reaper's retries
            put_back = self._put_back(
                keys=[keys.popped(self.queue), keys.job(job_id), keys.queued(self.queue)],
                args=[
                    job_id, rq_id, self.queue, Queue.redis_queue_namespace_prefix, Job.redis_job_namespace_prefix,
                    keys.worker_queue(self.queue, ""), keys.worker_claims(""),
                    job_record.STATE, job_record.RQ_ID, job_record.RQ_QUEUE, JobState.queued.value, JobStatus.QUEUED.value,
                ],
            )  # fmt: skip
            if put_back:
                log.warning("job %s: popped off its queue for a worker that never took it (dead or cut off); back on the shared queue", job_id)
                moved += 1
        return moved
