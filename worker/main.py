"""``hive worker``: a long-lived, non-forking RQ worker bound to one device.

RQ's default worker forks a child per job, which would drop the loaded models
with the child (and CUDA does not survive a fork); ``SimpleWorker`` runs every
job in this process, so models stay in memory between jobs.
"""

from __future__ import annotations

import logging

import redis

from shared.connections import sync_client
from shared.settings import Settings

log = logging.getLogger("hive.worker")


def run_worker(settings: Settings) -> None:
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from . import tasks
    from .runtime import WorkerRuntime

    connection = sync_client(settings.redis_url)
    runtime = WorkerRuntime(settings, connection)  # imports torch now, not on the first job
    tasks.install_runtime(runtime)
    # Its own queue first: the hive routes a job there when this worker is idle and
    # already holds the job's model; then the cluster's queue, shared by all.
    queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in (runtime.presence.own_queue, settings.queue)]
    rq_worker = SimpleWorker(queues, connection=connection, serializer=JSONSerializer, name=runtime.name)
    if settings.metrics_port:
        runtime.metrics.serve(settings.metrics_port)  # before taking jobs: a port in use stops the worker here
    runtime.presence.start()
    log.info("worker %s ready on %s, budget %.0f MiB: %r", runtime.name, runtime.device, runtime.models.budget_bytes / 2**20, settings)
    try:
        rq_worker.work(with_scheduler=False, logging_level="WARNING")
    finally:
        try:
            runtime.presence.leave()
        except redis.RedisError as e:  # it drops off the lists by itself within three heartbeats
            log.warning("could not leave the worker lists: %s", e)
