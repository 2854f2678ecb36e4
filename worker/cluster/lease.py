"""The worker's leases on the jobs it runs: renewed every second, all in one
pipeline, from a thread of its own, so a worker that dies (SIGKILL, the OOM killer)
stops renewing and the hive notices within LEASE_S. RQ's non-forking worker sends
no heartbeat during a job, and its registries take minutes to notice a dead worker.

A lease can also be lost while the worker lives: Redis was unreachable for longer
than LEASE_S, and a hive's reaper took the job over (retried or ended it). The
renewal sees that (the job left ``keys.RUNNING``), sets the job's ``lost`` event,
and the worker abandons that job without writing to its stream again."""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared import keys
from shared.clock import RedisClock
from worker.engine.running_job import RunningJob, RunningJobs

log = logging.getLogger("worker.lease")


class LeaseRenewal:
    def __init__(self, connection: redis.Redis, clock: RedisClock, running: RunningJobs, ttl_s: int):
        self._redis = connection
        self._clock = clock  # the hive's reaper compares the deadlines with its own reading of it
        self._running = running
        self._ttl_s = ttl_s
        self._thread = threading.Thread(target=self._renew_forever, name="hive-lease", daemon=True)
        self._thread.start()

    def reclaim(self, job: RunningJob) -> bool:
        """After an outage: whether the job is still this worker's, renewing it if so."""
        if self._redis.zadd(keys.RUNNING, {job.job_id: keys.lease_deadline(self._clock.now())}, xx=True, ch=True):
            return True
        job.lost.set()
        return False

    def renew_once(self) -> None:
        # Only leases granted so far: a job's reporter grants it as it takes the job
        # (a renewal before the grant would find no lease and take the job for lost).
        held = [job for job in self._running.all() if job.reporter is not None and not job.released]
        if not held:
            return
        deadline = keys.lease_deadline(self._clock.now())
        with self._redis.pipeline(transaction=False) as pipe:
            for job in held:
                # XX: never re-grant a lease the job gave back or a reaper took.
                pipe.zadd(keys.RUNNING, {job.job_id: deadline}, xx=True, ch=True)
            # The set is shared: it lives while any lease is renewed (a job may run
            # longer than the TTL), and expires once none is.
            pipe.expire(keys.RUNNING, self._ttl_s)
            renewed = pipe.execute()[:-1]
        for job, ok in zip(held, renewed):
            # A job that ended meanwhile gave its lease back: that is no loss.
            if not ok and not job.released:
                log.warning("job %s: lease lost (a hive took the job over); abandoning it", job.job_id)
                job.lost.set()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(keys.LEASE_RENEW_S)
            try:
                self.renew_once()
            except redis.RedisError as e:  # renewal loop boundary: try again next second
                log.warning("renewing the leases failed: %s", e)
