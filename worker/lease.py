"""The worker's lease on the job it runs: renewed every second from a thread of
its own, so a worker that dies (SIGKILL, the OOM killer) stops renewing and the
hive notices within LEASE_S. RQ's non-forking worker sends no heartbeat during a
job, and its registries take minutes to notice a dead worker.

A lease can also be lost while the worker lives: Redis was unreachable for longer
than LEASE_S, and a hive's reaper took the job over (retried or ended it). The
renewal sees that (the job left ``keys.RUNNING``) and the worker abandons the job
without writing to its stream again."""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared import keys

log = logging.getLogger(__name__)


class JobLease:
    def __init__(self, connection: redis.Redis, ttl_s: int):
        self._redis = connection
        self._ttl_s = ttl_s
        self._job_id: str | None = None
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_forever, name="hive-lease", daemon=True)
        self._thread.start()

    def hold(self, job_id: str) -> None:
        """From now on the lease of ``job_id`` is renewed (the first grant goes with
        the job's pickup, in the reporter's first round trip)."""
        with self._lock:
            self._job_id = job_id
            self._lost.clear()

    def release(self) -> None:
        with self._lock:
            self._job_id = None

    @property
    def lost(self) -> bool:
        """A hive's reaper took the current job over."""
        return self._lost.is_set()

    def reclaim(self, job_id: str) -> bool:
        """After an outage: whether the job is still this worker's, renewing it if so."""
        if self._redis.zadd(keys.RUNNING, {job_id: keys.lease_deadline()}, xx=True, ch=True):
            return True
        self._lost.set()
        return False

    def _renew_forever(self) -> None:
        while True:
            time.sleep(keys.LEASE_RENEW_S)
            with self._lock:
                job_id = self._job_id
            if job_id is None:
                continue
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    # XX: never re-grant a lease the job gave back or a reaper took.
                    pipe.zadd(keys.RUNNING, {job_id: keys.lease_deadline()}, xx=True, ch=True)
                    # The set is shared: it lives while any lease is renewed (a job
                    # may run longer than the TTL), and expires once none is.
                    pipe.expire(keys.RUNNING, self._ttl_s)
                    renewed = pipe.execute()[0]
            except redis.RedisError as e:  # renewal loop boundary: try again next second
                log.warning("renewing the lease of job %s failed: %s", job_id, e)
                continue
            with self._lock:
                if not renewed and self._job_id == job_id:
                    log.warning("job %s: lease lost (a hive took the job over); abandoning it", job_id)
                    self._lost.set()
