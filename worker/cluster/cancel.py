"""Cooperative cancellation: which of the jobs this worker runs have been cancelled.

RQ's stop-job command kills a forked work horse, which a non-forking worker does
not have. Instead the hive sets a per-job flag and publishes the job id; this
listener, on a thread of its own, sets the running job's ``cancelled`` event, so
the engine checks an in-memory flag between steps (no Redis command per token),
and the download and the loader check it between chunks and layers.
"""

from __future__ import annotations

import logging
import threading

import redis

from shared import keys
from worker.engine.running_job import RunningJobs

log = logging.getLogger("worker.cancel")


class CancelListener:
    def __init__(self, connection: redis.Redis, running: RunningJobs):
        self._running = running
        self._pubsub = connection.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(**{keys.CANCEL_CHANNEL: self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=1.0, daemon=True, exception_handler=self._on_error)

    def _on_message(self, message: dict) -> None:
        job_id = message["data"]
        job = self._running.get(job_id.decode() if isinstance(job_id, bytes) else job_id)
        if job is not None:
            job.cancelled.set()

    @staticmethod
    def _on_error(error: BaseException, pubsub, thread) -> None:
        # Listener loop boundary: the flag set on the job still catches a cancel
        # at pickup; keep listening once Redis is back.
        log.warning("cancel listener: %s; reconnecting", error)
        threading.Event().wait(1.0)
