"""Cooperative cancellation: whether the job this worker runs has been cancelled.

RQ's stop-job command kills a forked work horse, which a non-forking worker does
not have. Instead the hive sets a per-job flag and publishes the job id; this
watcher listens on a thread of its own, so the decode loop checks an in-memory
flag between tokens (no Redis command per token), and the download and the
loader check it between chunks and layers.
"""

from __future__ import annotations

import logging
import threading

import redis

from shared import keys

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    code = "CANCELLED"


class CancelWatcher:
    def __init__(self, connection: redis.Redis):
        self._lock = threading.Lock()
        self._current: str | None = None
        self._cancelled = threading.Event()
        self._pubsub = connection.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(**{keys.CANCEL_CHANNEL: self._on_message})
        self._thread = self._pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=self._on_error
        )

    def _on_message(self, message: dict) -> None:
        job_id = message["data"]
        job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
        with self._lock:
            if job_id == self._current:
                self._cancelled.set()

    @staticmethod
    def _on_error(error: BaseException, pubsub, thread) -> None:
        # Listener loop boundary: the flag set on the job still catches a cancel
        # at pickup; keep listening once Redis is back.
        log.warning("cancel listener: %s; reconnecting", error)
        threading.Event().wait(1.0)

    def begin(self, job_id: str) -> None:
        """Before the job's flag is read, so no cancel falls between the two."""
        with self._lock:
            self._current = job_id
            self._cancelled.clear()

    def cancel_current(self) -> None:
        self._cancelled.set()

    def end(self) -> None:
        with self._lock:
            self._current = None
            self._cancelled.clear()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raises JobCancelled when the current job has been cancelled."""
        if self._cancelled.is_set():
            raise JobCancelled("cancelled by the client")
