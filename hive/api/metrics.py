"""``GET /metrics``: the hive's Prometheus figures.

Where each figure lives, and why:

- Cluster state kept in Redis (queue depth per RQ queue, live workers by state) is
  read at scrape time by this collector, so it is exact when scraped and costs
  nothing between scrapes. Every hive sharing a Redis reports the same values for
  its queue: aggregate them over hives with ``max()``, not ``sum()``.
- This process's own state (``hive_active_streams``: its SSE followers) is read from
  the relay at scrape time; it adds up over hives.
- Per-job figures (jobs by outcome, queue wait, download, load, time to first
  token, tokens per second) are measured by the worker that runs the job and
  served on each worker's own ``/metrics`` (``hive worker --metrics-port``): see
  ``worker.metrics`` for why they are not relayed through Redis to the hive.
  ``hive_jobs_finished_total`` here counts the jobs a hive ends itself (cancelled
  while queued, TIMEOUT in the queue, WORKER_LOST): the same series on workers and
  hives add up to every job once.

Each app has a registry of its own (not prometheus_client's global one), so
several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import logging

import redis.exceptions
from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from rq import Queue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hive.api.state import hive_of
from shared import keys

log = logging.getLogger("hive.metrics")

#: Always reported, at zero when no worker is in them, so their series never vanish.
WORKER_STATES = ("idle", "busy")  # a busy worker's jobs each have their phase (/v1/workers)


def _rq_key(queue: str) -> str:
    return f"{Queue.redis_queue_namespace_prefix}{queue}"


class HiveMetrics:
    """One hive app's registry; itself the collector of the figures read at scrape
    time, from the snapshot ``refresh`` takes just before."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.jobs_finished = Counter(
            "hive_jobs_finished",
            "Jobs ended by this hive itself (workers count the jobs they end), by kind, outcome and error code.",
            ["kind", "outcome", "code"],
            registry=self.registry,
        )
        self._queue = ""
        self._depths: dict[str, int] | None = None  # None: Redis could not be read
        self._workers: dict[str, int] = {}
        self._keys: dict[str, dict[str, int]] = {}
        self._streams = 0
        self.registry.register(self)

    def job_ended(self, kind: str, outcome: str, code: str = "") -> None:
        """For the places where the hive ends a job (``JobService._end_here``)."""
        self.jobs_finished.labels(kind, outcome, code).inc()

    async def refresh(self, hive) -> None:
        """Reads what the next ``collect`` reports: four Redis round trips."""
        self._streams = hive.relay.followers
        self._queue = queue = hive.settings.queue
        connection = hive.jobs.redis
        try:
            names = await connection.zrangebyscore(keys.workers(queue), hive.jobs.clock.now() - keys.WORKER_DEAD_AFTER_S, "+inf")
            async with connection.pipeline(transaction=False) as pipe:
                pipe.llen(_rq_key(queue))
                for name in names:
                    pipe.hget(keys.worker(name), "state")
                    pipe.llen(_rq_key(keys.worker_queue(queue, name)))
                results = await pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.warning("metrics: Redis is unavailable, cluster figures left out: %s", e)
            self._depths, self._workers = None, {}
            return
        try:
            by_key = await hive.jobs.jobs_by_key(hive.auth.owners())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            by_key = {}
        self._keys = {hive.quotas.name_of(owner): counts for owner, counts in by_key.items()}
        self._depths = {queue: results[0]}
        self._workers = dict.fromkeys(WORKER_STATES, 0)
        for i, name in enumerate(names):
            state, depth = results[1 + 2 * i], results[2 + 2 * i]
            if state is None:  # its hash expired since the listing: dead
                continue
            self._workers[state] = self._workers.get(state, 0) + 1
            self._depths[keys.worker_queue(queue, name)] = depth

    def collect(self):
        streams = GaugeMetricFamily("hive_active_streams", "SSE streams open on this hive.")
        streams.add_metric([], self._streams)
        yield streams
        up = GaugeMetricFamily("hive_redis_up", "Whether this hive could read Redis for this scrape.")
        up.add_metric([], 0 if self._depths is None else 1)
        yield up
        if self._depths is None:
            return
        depth = GaugeMetricFamily(
            "hive_queue_depth", "Jobs waiting on each RQ queue: the shared one and each live worker's own.", labels=["queue"]
        )
        for name, count in sorted(self._depths.items()):
            depth.add_metric([name], count)
        yield depth
        workers = GaugeMetricFamily("hive_workers", "Live workers of this hive's queue, by state.", labels=["queue", "state"])
        for state, count in self._workers.items():
            workers.add_metric([self._queue, state], count)
        yield workers
        # Labelled by the key's name (--key-limits) or its id, never by the key itself.
        per_key = GaugeMetricFamily("hive_key_jobs", "Jobs of each API key, waiting or running.", labels=["key", "state"])
        for name, counts in sorted(self._keys.items()):
            for state, count in counts.items():
                per_key.add_metric([name, state], count)
        yield per_key


def app_metrics(app: Starlette) -> HiveMetrics:
    """The app's metrics, made on first use."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = app.state.metrics = HiveMetrics()
    return metrics


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus' text format (OpenMetrics when the scraper asks for it); wants an
    API key like every endpoint but ``/health``."""
    hive = hive_of(request)
    hive.auth.authenticate(request)
    metrics = app_metrics(request.app)
    await metrics.refresh(hive)
    # No await between refresh and generate: another scrape cannot swap the snapshot.
    encoder, content_type = choose_encoder(request.headers.get("accept"))
    return Response(encoder(metrics.registry), media_type=content_type)


routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]
