"""The worker's Prometheus figures, served by the worker itself (``--metrics-port``).

Each worker serves its own ``/metrics`` rather than pushing its figures into Redis
for the hive to expose, because:

- each figure is counted once, in the process that measures it, with
  prometheus_client's own counters and histograms: no bucket arithmetic in Redis,
  no extra Redis writes on the job path, nothing new there to expire;
- several hives share one Redis: had they exposed the workers' totals from Redis,
  each would report the same totals and ``sum()`` over hives would count every job
  once per hive; figures per process add up, as Prometheus expects;
- each worker (each GPU) is a target of its own, so a slow device shows as itself.

The price is one scrape target per worker (one port per worker on a machine). The
cluster-wide figures that live in Redis (queue depths, workers by state) and the
hive's own (active streams) are on the hive's ``/metrics``: see ``hive.api.metrics``.

Job figures come from what the worker writes to the job record (``MeasuredReporter``),
so ``/metrics`` and ``GET /v1/inference/<id>`` never disagree.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, make_wsgi_app

from shared import job_record, keys
from shared.events import Event
from shared.spec import JobState
from worker.cluster.reporter import JobReporter

log = logging.getLogger(__name__)

QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKENS_PER_S_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DOWNLOAD_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's own server, which answers only /metrics (start_http_server),
    with a thread per request: a slow scrape never holds up a liveness probe."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # a probe a few seconds would flood the log
        pass


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


class WorkerMetrics:
    """One worker's figures in a registry of its own (not prometheus_client's global
    one: a test process may hold several runtimes)."""

    def __init__(self, worker: str, device: str, queue: str):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, ...
        r = self.registry
        Info("hive_worker", "Which worker this target is.", registry=r).info({"worker": worker, "device": device, "queue": queue})
        self.jobs_finished = Counter(
            "hive_jobs_finished",
            "Jobs this worker ended, by kind (inference, pull), outcome (completed, failed, cancelled) and error code.",
            ["kind", "outcome", "code"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "hive_queue_wait_seconds", "From submit to a worker taking the job (a retried job: from its first submit).",
            buckets=QUEUE_WAIT_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "hive_time_to_first_token_seconds", "From the start of the prompt's forward pass to the first token.",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.tokens_per_second = Histogram(
            "hive_decode_tokens_per_second", "Per job: tokens after the first, over the time after the first token.",
            buckets=TOKENS_PER_S_BUCKETS, registry=r,
        )
        self.tokens = Counter("hive_generated_tokens", "Tokens generated.", registry=r)
        self.load_seconds = Histogram(
            "hive_model_load_seconds", "Loading a model onto the device (cold loads only).", buckets=LOAD_BUCKETS, registry=r
        )
        self.download_bytes = Counter(
            "hive_download_bytes", "Bytes this worker fetched from the hub (a failed download's too).", registry=r
        )
        self.download_seconds = Histogram(
            "hive_download_seconds", "Each download of a model's missing files from the hub, whatever its end.",
            buckets=DOWNLOAD_BUCKETS, registry=r,
        )

        self.capacity = Gauge("hive_batch_capacity", "Jobs this worker runs at once (--max-batch).", registry=r)
        self.batch_size = Gauge("hive_batch_size", "Sequences in the model's batch now (prefilling or decoding).", ["model"], registry=r)
        self.kv_cache_bytes = Gauge(
            "hive_kv_cache_bytes", "Bytes the model's batch KV cache takes now (its rows and its cached prefix blocks).", ["model"], registry=r
        )
        self.kv_cache_used_bytes = Gauge("hive_kv_cache_used_bytes", "Bytes of the model's KV cache its live tokens hold.", ["model"], registry=r)
        self.preemptions = Counter(
            "hive_preemptions", "Sequences preempted for memory (recomputed later from their tokens).", ["model"], registry=r
        )
        self.prefix_queries = Counter(
            "hive_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model"], registry=r
        )
        self.prefix_hits = Counter(
            "hive_prefix_cache_hits", "Prompt tokens found in the prefix cache (copied, not computed).", ["model"], registry=r
        )
        self.token_commands = Counter(
            "hive_token_commands", "Redis commands the batches sent for tokens (two a token: XADD and PUBLISH).", registry=r
        )
        self.slot_wait = Histogram(
            "hive_slot_wait_seconds", "From submit to the job's prefill in its model's batch (queue, download, load and the wait for a slot).",
            buckets=QUEUE_WAIT_BUCKETS, registry=r,
        )

    def batch_changed(self, model: str, size: int, kv_bytes: int) -> None:
        self.batch_size.labels(model).set(size)
        self.kv_cache_bytes.labels(model).set(kv_bytes)

    def stepped(self, model: str, used_bytes: int, prefix_queries: int, prefix_hits: int, preempted: int) -> None:
        self.kv_cache_used_bytes.labels(model).set(used_bytes)
        if preempted:
            self.preemptions.labels(model).inc(preempted)
        if prefix_queries:
            self.prefix_queries.labels(model).inc(prefix_queries)
        if prefix_hits:
            self.prefix_hits.labels(model).inc(prefix_hits)

    def sent(self, commands: int) -> None:
        self.token_commands.inc(commands)

    def admitted(self, job) -> None:
        created_at = getattr(job.reporter, "created_at", None)
        if created_at:
            self.slot_wait.observe(max(0.0, job.reporter.clock.now() - created_at))

    def serve(self, port: int, host: str = "0.0.0.0", liveness: Callable[[], dict] | None = None) -> None:
        """Serves ``/metrics`` on ``host:port`` from a daemon thread, and ``/livez``:
        200 or 503 as ``liveness()["alive"]`` says, with its JSON (worker/cluster/liveness.py)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/livez" and liveness is not None:
                status = liveness()
                body = json.dumps(status).encode()
                start_response("200 OK" if status["alive"] else "503 Service Unavailable",
                               [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            return metrics_app(environ, start_response)

        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="hive-metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, liveness on /livez", host, port)

    def model_loaded(self, load_ms: float) -> None:
        self.load_seconds.observe(load_ms / 1000)

    def downloaded(self, nbytes: int, seconds: float) -> None:
        self.download_bytes.inc(nbytes)
        self.download_seconds.observe(seconds)

    def job_finished(self, kind: str, state: JobState, fields: dict) -> None:
        """Counts a job that ended with ``state`` and the record ``fields`` written with it."""
        self.jobs_finished.labels(kind, state.value, str(fields.get(job_record.ERROR_CODE, ""))).inc()
        tokens = int(fields.get(job_record.TOKENS_OUT) or 0)
        if not tokens:
            return
        self.tokens.inc(tokens)
        if job_record.TTFT_MS in fields:
            self.ttft.observe(float(fields[job_record.TTFT_MS]) / 1000)
        decode_s = float(fields.get(job_record.DECODE_TIME_MS) or 0) / 1000
        if tokens > 1 and decode_s > 0:
            self.tokens_per_second.observe((tokens - 1) / decode_s)


class MeasuredReporter(JobReporter):
    """A JobReporter that also counts what it reports: the queue wait when it takes
    the job (``picked_at`` among its fields), the outcome and the token figures
    once the terminal event is out (a terminal event that did not make it to Redis
    counts nothing: whoever ends the job instead counts it)."""

    def __init__(self, metrics: WorkerMetrics, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = metrics
        created_at, kind = self.redis.hmget(keys.job(self.job_id), job_record.CREATED_AT, job_record.KIND)
        self.kind = _text(kind) or "inference"
        self.created_at = float(created_at) if created_at else None
        picked_at = kwargs.get(job_record.PICKED_AT)
        if picked_at is not None and created_at:
            # Both on Redis's clock, whichever hosts took them.
            metrics.queue_wait.observe(max(0.0, float(picked_at) - float(created_at)))

    def finish(self, final_event: Event, state: JobState, **fields) -> bool:
        written = super().finish(final_event, state, **fields)
        if written:  # a late end (the job was taken over) is the reaper's to count
            self._metrics.job_finished(self.kind, state, fields)
        return written
