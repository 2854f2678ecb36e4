"""Jobs on one worker: download → load → generate in the model's batch, every step
reported as events.

The worker process holds one ``WorkerRuntime`` (device, loaded models, one batching
engine per model, Redis connection). RQ's slot threads (worker/cluster/rq_slots.py) call
``worker.tasks.run_inference``, which hands the job to it: the job's thread
downloads and loads what it needs, then adds the job to the model's engine
and waits for it to end there, so RQ's own bookkeeping (status, registries)
follows each job.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
import torch
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from shared import job_record, keys
from shared.clock import RedisClock
from shared.connections import REDIS_DOWN, wait_for_writes
from shared.events import End, Error, Loading, Ready, Started
from shared.settings import Settings
from shared.spec import EmbeddingRequest, InferenceRequest, JobState, PullRequest
from worker.cluster.cancel import CancelListener
from worker.cluster.lease import LeaseRenewal
from worker.cluster.liveness import Liveness
from worker.cluster.presence import Presence
from worker.engine.prepare import prepare_sequence
from worker.engine.running_job import JobAbandoned, JobCancelled, RunningJob, RunningJobs
from worker.engine.step_loop import Engine
from worker.engine.unsupported import UnsupportedModel
from worker.metrics import MeasuredReporter, WorkerMetrics
from worker.model.download import fetch_model
from worker.model.embedder import embed
from worker.model.loaded_models import LoadedModel, LoadedModels, resolve_devices

log = logging.getLogger(__name__)

#: How long start-up waits for the first reading of Redis's clock.
CLOCK_WAIT_S = 10.0
#: How often a job's thread wakes while the engine runs its job: RQ's timeout
#: (TimerDeathPenalty) raises in this thread, and only between Python bytecodes.
WAIT_POLL_S = 0.2


def default_max_batch(device: torch.device) -> int:
    """Sequences per batch when --max-batch is not given. A decode step is bound by
    reading the weights, so more sequences cost little more per step: on this
    project's CPU a step of 32 costs 2.1× a step of 1 for 16× the tokens
    (bench/batching.py); a GPU has far more room (unmeasured here)."""
    return 64 if device.type == "cuda" else 32


def error_code(exc: BaseException) -> str:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return "OUT_OF_MEMORY"
    if isinstance(exc, JobTimeoutException):
        return "TIMEOUT"
    return getattr(exc, "code", "INFERENCE_FAILED")


class WorkerRuntime:
    def __init__(self, settings: Settings, connect: Callable[[int], redis.Redis]):
        """``connect(slots)``: the Redis client, its pool sized for that many slots."""
        self.settings = settings
        devices = resolve_devices(settings.device)
        self.device = devices[0]
        placement = "+".join(str(d) for d in devices)
        self.name = settings.worker_name or f"{socket.gethostname()}:{placement}:{os.getpid()}"
        self.max_batch = settings.max_batch or default_max_batch(self.device)
        self.redis = connection = connect(self.max_batch)
        #: Every time this worker writes to Redis (the hive compares them with its own),
        #: measured before the first lease or heartbeat (Redis has just answered).
        self.clock = RedisClock(connection)
        self.clock.start(wait_s=CLOCK_WAIT_S)
        self.models = LoadedModels(devices, settings.dtype, settings.max_memory, settings.keep_alive_s)
        self.models.kv_reserved = self._kv_bytes
        self.models.reclaim_kv = self._reclaim
        self.running = RunningJobs(self.max_batch)
        self.cancels = CancelListener(connection, self.running)
        self.leases = LeaseRenewal(connection, self.clock, self.running, settings.job_ttl_s)
        self.metrics = WorkerMetrics(self.name, placement, settings.queue)
        self.metrics.capacity.set(self.max_batch)
        self.presence = Presence(connection, self.clock, self.name, settings.queue, self.models, settings.job_ttl_s, self.running)
        self.liveness = Liveness(self.presence, settings.redis_url)
        self._engines: dict[tuple[str, str | None], Engine] = {}
        self._engines_lock = threading.Lock()
        # An engine stops with its model (evicted, or keep-alive over).
        unloaded = self.models.on_unload

        def on_unload(repo_id: str, revision: str | None) -> None:
            with self._engines_lock:
                engine = self._engines.pop((repo_id, revision), None)
            if engine is not None:
                engine.stop()
            unloaded(repo_id, revision)

        self.models.on_unload = on_unload

    def start(self) -> None:
        """Heartbeats, keep-alive expiry and the liveness watchdog, each on a thread of its own."""
        self.presence.start()
        threading.Thread(target=self._expire_forever, name="hive-keep-alive", daemon=True).start()
        self.liveness.start()

    def _expire_forever(self) -> None:
        """Unloads the models whose keep-alive ran out, apart from the heartbeats: each
        unload runs a full garbage collection and stops the model's engine, and models
        loaded in a burst expire together."""
        while True:
            time.sleep(keys.HEARTBEAT_S)
            try:
                self.models.unload_expired()
            except Exception:  # expiry loop boundary: try again next second
                log.exception("unloading expired models failed")

    def _engines_but(self, besides: tuple | None) -> list[Engine]:
        with self._engines_lock:
            return [e for k, e in self._engines.items() if k != besides]

    def _kv_bytes(self, besides: tuple | None = None) -> int:
        """The KV-cache bytes the batches may take (of every model but ``besides``)."""
        return sum(e.kv_reserved for e in self._engines_but(besides))

    def _reclaim(self, nbytes: int, besides: tuple | None = None) -> int:
        """Drops cached prefix blocks (worker/kv/prefix.py) of every model but ``besides``
        to free ``nbytes`` for a batch or a model to load; returns the bytes freed."""
        freed = 0
        for engine in self._engines_but(besides):
            freed += engine.reclaim(nbytes - freed) if freed < nbytes else 0
        return freed

    def engine_for(self, loaded: LoadedModel) -> Engine:
        with self._engines_lock:
            engine = self._engines.get(loaded.key)
            if engine is None:
                engine = Engine(
                    loaded.model,
                    loaded.repo_id,
                    self.redis,
                    self.max_batch,
                    # The cache may take the budget less the models and the other models' batches.
                    lambda: self.models.budget_bytes - self.models.used_bytes - self._kv_bytes(besides=loaded.key),
                    self.metrics,
                    self.settings.token_delay_ms / 1000,
                    lambda: sum(j.model == loaded.repo_id and j.phase == "taken" for j in self.running.active()),
                    f"{loaded.repo_id}@{loaded.revision or 'main'}:{loaded.model.dtype}" if self.settings.prefix_cache else None,
                    reclaim=lambda nbytes: self._reclaim(nbytes, besides=loaded.key),
                    prefix_cap=self.settings.prefix_cache_bytes,
                )
                self._engines[loaded.key] = engine
            return engine

    def run_job(self, job_id: str, spec: dict, kind: str = "inference") -> None:
        """Runs a job of ``kind`` (shared/job_record.py's TASKS: inference, pull, the
        download only, or embedding) on the calling RQ slot thread, until it ends."""
        job = RunningJob(job_id, str(spec.get("model", "")))
        self.running.add(job)
        try:
            rq_job = get_current_job()
            routed_here = rq_job is not None and rq_job.origin == self.presence.own_queue
            self.presence.busy(job, routed_here=routed_here)
            queue = self.settings.queue
            job.reporter = MeasuredReporter(
                self.metrics,
                self.redis,
                self.clock,
                job_id,
                self.settings.job_ttl_s,
                unqueue=(keys.queued(queue), keys.queued_for_model(queue, job.model), keys.fair(queue)),
                before_finish=lambda: self._going_idle(job),
                **{job_record.WORKER: self.name, job_record.PICKED_AT: self.clock.now()},
            )
            if job.reporter.cancelled_before_start:
                job.cancelled.set()
            if not routed_here and self.settings.prefix_cache and job.reporter.prefixes:  # (routed: the hive named it)
                self.presence.hold_prefixes(job.reporter.prefixes)  # off the shared queue: the prompt's prefix is here now
            self._run_to_end(job, spec, kind)
        except REDIS_DOWN as e:
            self._after_outage(job, e)
        finally:
            self.running.remove(job)
            try:
                self._going_idle(job)  # the job ended without a terminal event of its own: no-op otherwise
            except REDIS_DOWN as e:  # the next heartbeat says idle; warm routing resumes after the next job
                log.warning("could not list this worker as idle: %s", e)
            self.models.unload_expired()  # keep_alive 0, now that the job's end is out

    def _run_to_end(self, job: RunningJob, spec: dict, kind: str) -> None:
        reporter = job.reporter
        try:
            job.check()
            if kind == "pull":
                self._pull(job, PullRequest.model_validate(spec))
            elif kind == "embedding":
                self._embed(job, EmbeddingRequest.model_validate(spec))
            else:
                self._run(job, InferenceRequest.model_validate(spec))
        except JobAbandoned:
            log.warning("job %s: abandoned, its lease was taken over", job.job_id)
        except REDIS_DOWN:
            raise
        except JobCancelled as e:
            log.info("job %s cancelled before its first token", job.job_id)
            reporter.finish(Error(e.code, str(e)), JobState.cancelled, **{job_record.ERROR_CODE: e.code, job_record.ERROR_MESSAGE: str(e)})
        except Exception as e:  # job boundary: every failure ends the stream with an error event
            # Unless a hive's reaper already ended or retried it: a worker cut off from
            # Redis (a partition, not a crash) fails its step with whatever the late
            # writes met (an XADD refused past the reaper's event) before its lease
            # renewal notices. The lease decides, as after an outage; renewing it here
            # keeps a reaper off the job until its terminal event is out.
            if not self.leases.reclaim(job):
                log.warning("job %s: abandoned, its lease was taken over (it had failed with %r)", job.job_id, e)
                return
            log.exception("job %s failed", job.job_id)
            code = error_code(e)
            message = str(e) or type(e).__name__
            reporter.finish(Error(code, message), JobState.failed, **{job_record.ERROR_CODE: code, job_record.ERROR_MESSAGE: message})

    def _going_idle(self, job: RunningJob) -> None:
        """Just before the job's terminal event goes out: its lease is given back (so
        its renewal cannot find it gone and cry "lost"), its model is let go with
        its keep-alive, and the slot is claimable again; a client that sends its next
        request on `end` finds this worker warm. Once per job."""
        if job.released:
            return
        job.released = True
        if job.holding is not None:
            self.models.release(*job.holding)
            job.holding = None
        self.presence.slot_freed(job)

    def _after_outage(self, job: RunningJob, error: Exception) -> None:
        """Redis went away mid-job. Wait for it (returning now would leave RQ's own
        bookkeeping to fail and stop the worker), then end the job with a clear
        error, unless a hive's reaper took it over meanwhile (the lease decides,
        as between two reapers) or Redis came back without it."""
        log.warning("job %s: lost Redis (%s); waiting for it to come back", job.job_id, error)
        outage_s = wait_for_writes(self.redis)
        if not self.leases.reclaim(job):
            log.warning("job %s: Redis is back after %.1f s; a hive has taken the job over", job.job_id, outage_s)
            return
        message = f"the worker lost its connection to Redis mid-job for {outage_s:.1f} s"
        log.warning("job %s: Redis is back after %.1f s; ending the job with REDIS_UNAVAILABLE", job.job_id, outage_s)
        # A fresh reporter re-reads where the log stands: some events may not have made it.
        reporter = MeasuredReporter(self.metrics, self.redis, self.clock, job.job_id, self.settings.job_ttl_s)
        if job.reporter is not None:
            # Never an id already used: after a failover the log may lack events its
            # followers have seen (the hive marks the hole with a `gap` event).
            reporter.seq = max(reporter.seq, job.reporter.seq)
        reporter.finish(
            Error("REDIS_UNAVAILABLE", message),
            JobState.failed,
            **{job_record.ERROR_CODE: "REDIS_UNAVAILABLE", job_record.ERROR_MESSAGE: message},
        )

    def _model(self, job: RunningJob, request: InferenceRequest | EmbeddingRequest) -> tuple[LoadedModel, bool, float]:
        """The model, loaded and marked in use (the caller releases it). Jobs for
        one model that arrive while it loads wait for that load (LoadedModels's lock)."""
        reporter = job.reporter
        with self.models.loading(request.model, request.revision):
            loaded = self.models.take(request.model, request.revision)
            if loaded is not None:
                return loaded, True, 0.0
            job.phase = "downloading"
            reporter.update(JobState.downloading)
            self.presence.beat(downloaded=True)
            # Fail fast, before the download, when even the smallest the weights can take
            # on the device (stored in fp32, loaded in half precision) exceeds the budget;
            # the exact check, from the safetensors headers, comes before loading.
            folder = fetch_model(
                request.model,
                request.revision,
                reporter.emit,
                job.check,
                lambda n: self.models.check_fits(request.model, n // 2),
                self.metrics.downloaded,
            )
            job.check()
            job.phase = "loading"
            reporter.update(JobState.loading)
            self.presence.beat()

            def on_layer(p):
                reporter.emit(Loading(p.layers_loaded, p.layers_total, p.vram_mb, p.device))
                job.check()

            loaded = self.models.load(request.model, request.revision, folder, on_layer)
        self.metrics.model_loaded(loaded.load_ms)
        return loaded, False, loaded.load_ms

    def _pull(self, job: RunningJob, request: PullRequest) -> None:
        job.phase = "downloading"
        job.reporter.update(JobState.downloading)
        self.presence.beat(downloaded=True)
        fetch_model(request.model, request.revision, job.reporter.emit, job.check, on_downloaded=self.metrics.downloaded)
        job.reporter.finish(End(0, 0.0, 0.0, "pulled"), JobState.completed, **{job_record.TOKENS_OUT: 0, job_record.STOP_REASON: "pulled"})

    def _run(self, job: RunningJob, request: InferenceRequest) -> None:
        loaded, warm, load_ms = self._model(job, request)
        job.holding = (loaded, request.keep_alive)
        job.check()
        if not loaded.model.can_generate():  # a bare model (worker/model/loader.py: model_class)
            raise UnsupportedModel(f"{request.model} has no language-model head: it serves /v1/embeddings only")
        reporter = job.reporter
        reporter.emit(Ready(load_ms, warm))
        job.sequence = prepare_sequence(loaded.model, loaded.tokenizer, request)
        if request.prefix_cache:
            job.cache_salt = reporter.owner if self.settings.prefix_cache_scope == "key" else ""
        prompt_tokens = len(job.sequence.prompt_ids)
        engine = self.engine_for(loaded)
        engine.check_fits_alone(job)  # before `started`: a job that can never fit fails now
        started_at = self.clock.now()
        reporter.emit(Started(job.job_id, request.model, self.name, started_at), JobState.running, **{job_record.STARTED_AT: started_at})
        job.phase = "waiting"
        engine.add_job(job)
        self._wait(job, engine)
        self._finish(job, prompt_tokens, load_ms)

    def _embed(self, job: RunningJob, request: EmbeddingRequest) -> None:
        """Pools the model's hidden states on this thread (worker/model/embedder.py), beside
        the model's batch; the vectors go to their own key just before the job's end."""
        loaded, warm, load_ms = self._model(job, request)
        job.holding = (loaded, request.keep_alive)
        job.check()
        reporter = job.reporter
        reporter.emit(Ready(load_ms, warm))
        started_at = self.clock.now()
        reporter.emit(Started(job.job_id, request.model, self.name, started_at), JobState.running, **{job_record.STARTED_AT: started_at})
        job.phase = "running"
        start = time.perf_counter()
        result = embed(loaded.model, loaded.tokenizer, loaded.folder, request.texts, self.models.device, request.dimensions, job.check)
        took_ms = round((time.perf_counter() - start) * 1000, 2)
        vectors = base64.b64encode(result.vectors.numpy().astype("<f4").tobytes())
        self.redis.set(keys.job_embeddings(job.job_id), vectors, ex=keys.EMBEDDINGS_TTL_S)
        reporter.finish(
            End(0, took_ms, took_ms, "embedded"),
            JobState.completed,
            **{
                job_record.TOKENS_OUT: 0,
                job_record.PROMPT_TOKENS: result.prompt_tokens,
                job_record.EMBEDDING_DIM: result.vectors.shape[1],
                job_record.DECODE_TIME_MS: took_ms,
                job_record.LOAD_MS: load_ms,
                job_record.STOP_REASON: "embedded",
            },
        )

    def _wait(self, job: RunningJob, engine: Engine) -> None:
        """Until the engine lets go of the job. RQ's timeout lands here: the job
        leaves the batch at the next step, then ends with TIMEOUT."""
        try:
            while not job.done.wait(WAIT_POLL_S):
                pass
        except JobTimeoutException:
            job.timed_out.set()
            engine.poke()
            job.done.wait()
            raise

    def _finish(self, job: RunningJob, prompt_tokens: int, load_ms: float) -> None:
        outcome = job.outcome
        if outcome.error is not None:
            raise outcome.error
        if outcome.stop_reason == "abandoned":
            raise JobAbandoned()
        if outcome.stop_reason == "timeout":
            raise JobTimeoutException(f"the job ran past its timeout ({self.settings.job_timeout_s} s)")
        count = job.tokens
        if outcome.stop_reason == "cancelled" and not count:
            raise JobCancelled("cancelled by the client")
        first_at = job.first_at or job.ended_at
        ttft_ms = round((first_at - job.submitted_at) * 1000, 2)
        decode_ms = round((job.ended_at - first_at) * 1000, 2)
        stop_reason = outcome.stop_reason
        job.reporter.finish(
            End(count, decode_ms, ttft_ms, stop_reason, job.cached_tokens),
            JobState.cancelled if stop_reason == "cancelled" else JobState.completed,
            **{
                job_record.OUTPUT: "".join(job.pieces),
                job_record.TOKENS_OUT: count,
                job_record.TTFT_MS: ttft_ms,
                job_record.DECODE_TIME_MS: decode_ms,
                job_record.LOAD_MS: load_ms,
                job_record.STOP_REASON: stop_reason,
                job_record.PROMPT_TOKENS: prompt_tokens,
                job_record.CACHED_TOKENS: job.cached_tokens,
                **({job_record.TOOL_CALLS: tools.record_json()} if (tools := job.sequence.tool_calls) and tools.calls else {}),
            },
        )
