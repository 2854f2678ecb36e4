"""Redis outages inside RQ's own worker loop: waited out, never fatal.

RQ's ``Worker.work()`` quits on any exception it did not expect ("found an
unhandled exception, quitting..."), and most of its steps talk to Redis: the
suspension check, the registry maintenance, the heartbeat, the worker's state, the
read of a job it just popped, and the bookkeeping after a job (``handle_job_success``
→ ``job.cleanup``, ``handle_job_failure``). Redis gone at any of those moments
stopped the worker for good. Here each such step, when Redis cannot be reached,
waits for it to answer (saying so, every few seconds, as at start-up: see
``shared.connections.wait_for_redis``) and then runs again. The steps wrapped this
way are the ones safe to run twice (writes of the same state, a read); the job
itself never runs again: only the bookkeeping after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis
from rq import Queue

from shared.connections import REDIS_DOWN, wait_for_redis

log = logging.getLogger("worker.outages")

T = TypeVar("T")


def where(connection: redis.Redis) -> str:
    """The Redis a client talks to, for the log: host, port and db, no credentials."""
    options = connection.connection_pool.connection_kwargs
    if "path" in options:
        return f"unix://{options['path']}?db={options.get('db', 0)}"
    return f"redis://{options.get('host', 'localhost')}:{options.get('port', 6379)}/{options.get('db', 0)}"


def wait_out(connection: redis.Redis, who: str, what: str, error: Exception) -> None:
    """Blocks until Redis answers again, after ``what`` failed with ``error``."""
    wait_for_redis(connection, where(connection), f"{who}: {what} lost Redis ({error})", log)


def ride_out(connection: redis.Redis, who: str, what: str, call: Callable[..., T], /, *args, **kwargs) -> T:
    """``call(*args, **kwargs)``, run again once Redis answers for as long as Redis
    cannot be reached. Only for steps that may run twice."""
    while True:
        try:
            return call(*args, **kwargs)
        except REDIS_DOWN as e:
            wait_out(connection, who, what, e)


class SlotQueue(Queue):
    """RQ's queue, whose dequeue waits out an outage instead of RQ's own retries
    (an error logged at each, backing off to a minute between tries, so a worker
    could take a minute to notice Redis was back), and whose read of a job it has
    just popped waits too: RQ would drop that job (popped, never run)."""

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, **kwargs):
        # Run again, the pop takes nothing twice. A pop whose answer was lost with Redis may
        # have taken a job: Hive still lists it as queued, and its queue-wait timeout ends it.
        return ride_out(connection, "worker", "RQ's dequeue", super().dequeue_any, queues, timeout, connection=connection, **kwargs)

    @classmethod
    def _fetch_dequeued_job(cls, connection, queue_key, job_id, **kwargs):
        return ride_out(
            connection, "worker", f"reading job {job_id}, just taken off {queue_key},", super()._fetch_dequeued_job,
            connection, queue_key, job_id, **kwargs,
        )
