"""``hive worker``: a long-lived process bound to one device, taking up to
``--max-batch`` jobs at once from RQ (worker/cluster/rq_slots.py) and running them in one
batch per model (worker/engine/step_loop.py); models stay in memory between jobs.
"""

from __future__ import annotations

import logging

import redis

from shared.connections import dead_peer_options, sync_client, wait_for_redis
from shared.settings import Settings

log = logging.getLogger("hive.worker")

#: Connections the worker holds for as long as it runs, besides its slots': the
#: cancel listener's and the model-delete listener's pub/sub.
LISTENERS = 2
#: Borrowed for one command or pipeline and given back at once: the heartbeat, the
#: lease renewal, the clock, the job threads' events and RQ's own bookkeeping. Under
#: a burst they queue for a connection (the pool blocks) rather than fail.
SHORT_LIVED = 16


def pool_size(slots: int) -> int:
    """The worker's Redis connections, counted by who holds them. Each RQ slot holds
    two for as long as it runs (its BLPOP, its command listener's pub/sub); each
    engine holds one while its batch runs, and a batch runs only with a job, which
    takes a slot: at most one a slot (an idle engine gives its own back,
    worker/engine/step_writer.py). Loaded models cost nothing."""
    return 2 * slots + slots + LISTENERS + SHORT_LIVED


def run_worker(settings: Settings) -> None:
    def connection_for(slots: int):
        return sync_client(settings.redis_url, max_connections=pool_size(slots), **dead_peer_options())

    from rq.serializers import JSONSerializer

    from worker import tasks
    from worker.cluster.rq_outages import SlotQueue
    from worker.cluster.rq_slots import Slots
    from worker.runtime import WorkerRuntime

    # Started before Redis answers, the worker waits for it (and says so) rather than exits.
    probe = sync_client(settings.redis_url)
    try:
        wait_for_redis(probe, settings.redis_url, "worker", log)
    finally:
        probe.close()
    runtime = WorkerRuntime(settings, connection_for)  # imports torch now, not on the first job
    connection = runtime.redis
    tasks.install_runtime(runtime)
    # Its own queue first: the hive routes a job there when this worker is idle and
    # already holds the job's model; then the cluster's queue, shared by all.
    queues = [SlotQueue(name, connection=connection, serializer=JSONSerializer) for name in (runtime.presence.own_queue, settings.queue)]
    slots = Slots(runtime.max_batch, queues, connection, JSONSerializer, runtime.name)
    if settings.metrics_port:
        # Before taking jobs: a port in use stops the worker here.
        runtime.metrics.serve(settings.metrics_port, liveness=runtime.liveness.status)
    runtime.start()
    log.info(
        "worker %s ready on %s, %d slots, budget %.0f MiB: %r",
        runtime.name, runtime.device, runtime.max_batch, runtime.models.budget_bytes / 2**20, settings,
    )
    try:
        slots.work()
    finally:
        try:
            runtime.presence.leave()
        except redis.RedisError as e:  # it drops off the lists by itself within three heartbeats
            log.warning("could not leave the worker lists: %s", e)
