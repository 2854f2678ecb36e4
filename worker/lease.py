"""The worker's lease on the job it runs: renewed every second from a thread of
its own, so a worker that dies (SIGKILL, the OOM killer) stops renewing and the
hive notices within LEASE_S. RQ's non-forking worker sends no heartbeat during a
job, and its registries take minutes to notice a dead worker."""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared import keys

log = logging.getLogger(__name__)


class JobLease:
    def __init__(self, connection: redis.Redis):
        self._redis = connection
        self._job_id: str | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_forever, name="hive-lease", daemon=True)
        self._thread.start()

    def hold(self, job_id: str) -> None:
        """From now on the lease of ``job_id`` is renewed (the first grant goes with
        the job's pickup, in the reporter's first round trip)."""
        with self._lock:
            self._job_id = job_id

    def release(self) -> None:
        with self._lock:
            self._job_id = None

    def _renew_forever(self) -> None:
        while True:
            time.sleep(keys.LEASE_RENEW_S)
            with self._lock:
                job_id = self._job_id
            if job_id is None:
                continue
            try:  # XX: never re-grant a lease the job already gave back
                self._redis.zadd(keys.RUNNING, {job_id: keys.lease_deadline()}, xx=True)
            except redis.RedisError as e:  # renewal loop boundary: try again next second
                log.warning("renewing the lease of job %s failed: %s", job_id, e)
