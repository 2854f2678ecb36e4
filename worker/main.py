"""``hive worker``: a long-lived, non-forking RQ worker bound to one device.

RQ's default worker forks a child per job, which would drop the loaded models
with the child (and CUDA does not survive a fork); ``SimpleWorker`` runs every
job in this process, so models stay in memory between jobs.
"""

from __future__ import annotations

import logging

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
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer)
    rq_worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer, name=runtime.name)
    log.info("worker %s ready on %s: %r", runtime.name, runtime.device, settings)
    rq_worker.work(with_scheduler=False, logging_level="WARNING")
