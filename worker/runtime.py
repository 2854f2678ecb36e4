"""One job on one worker: download → load → generate, every step reported as events.

The worker process holds one ``WorkerRuntime`` (device, loaded models, Redis
connection); RQ calls ``worker.tasks.run_inference`` which hands the job to it.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import redis
import torch
from rq.timeouts import JobTimeoutException

from shared import jobs, keys
from shared.events import End, Error, Loading, Ready, Started, Token
from shared.settings import Settings
from shared.spec import InferenceRequest, JobState, PullRequest

from .cancel import CancelWatcher, JobCancelled
from .lease import JobLease
from .download import fetch_model
from .generate import SamplingParams, generate_tokens
from .metrics import MeasuredReporter, WorkerMetrics
from .models import LoadedModel, ModelCache, resolve_devices
from .presence import Presence
from .reporter import JobReporter

log = logging.getLogger(__name__)


#: Redis could not be reached, even after the client's own retries.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
OUTAGE_POLL_S = 0.5


class JobAbandoned(Exception):
    """A hive's reaper took the job over: this worker must not write to it again."""


class InvalidRequest(Exception):
    code = "INVALID_REQUEST"


def encode_prompt(tokenizer, request: InferenceRequest) -> list[int]:
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{request.model} has no chat template: send 'prompt' instead of 'messages'")
        messages = [m.model_dump() for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError, raise_exception() in templates
            raise InvalidRequest(f"{request.model}'s chat template rejected these messages: {e}") from e
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise InvalidRequest("the prompt encodes to no tokens")
        ids = [tokenizer.bos_token_id]
    return list(ids)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return "OUT_OF_MEMORY"
    if isinstance(exc, JobTimeoutException):
        return "TIMEOUT"
    return getattr(exc, "code", "INFERENCE_FAILED")


class WorkerRuntime:
    def __init__(self, settings: Settings, connection: redis.Redis):
        self.settings = settings
        self.redis = connection
        devices = resolve_devices(settings.device)
        self.device = devices[0]
        placement = "+".join(str(d) for d in devices)
        self.name = settings.worker_name or f"{socket.gethostname()}:{placement}:{os.getpid()}"
        self.models = ModelCache(devices, settings.dtype, settings.max_memory, settings.keep_alive_s)
        self.cancels = CancelWatcher(connection)
        self.lease = JobLease(connection, settings.job_ttl_s)
        self.presence = Presence(connection, self.name, settings.queue, self.models, settings.job_ttl_s)
        self.metrics = WorkerMetrics(self.name, placement, settings.queue)
        #: The current job's model and its keep_alive, until the job lets it go.
        self._holding: tuple[LoadedModel, float | None] | None = None
        self._idle = True

    def run_job(self, job_id: str, spec: dict, pull: bool = False) -> None:
        """Runs an inference job, or with ``pull`` a pull job (download only)."""
        self.cancels.begin(job_id)
        self._idle = False
        reporter: MeasuredReporter | None = None
        try:
            self.presence.busy(job_id)
            queue, model = self.settings.queue, str(spec.get("model", ""))
            reporter = MeasuredReporter(
                self.metrics,
                self.redis,
                job_id,
                self.settings.job_ttl_s,
                unqueue=(keys.queued(queue), keys.queued_for_model(queue, model)),
                before_finish=self._going_idle,
                **{jobs.WORKER: self.name, jobs.PICKED_AT: time.time()},
            )
            # Renewed from now on: the reporter granted it (a renewal before the grant
            # would find no lease and take the job for lost).
            self.lease.hold(job_id)
            if reporter.cancelled_before_start:
                self.cancels.cancel_current()
            try:
                self._check()
                if pull:
                    self._pull(PullRequest.model_validate(spec), reporter)
                else:
                    self._run(job_id, InferenceRequest.model_validate(spec), reporter)
            except JobAbandoned:
                log.warning("job %s: abandoned, its lease was taken over", job_id)
            except REDIS_DOWN:
                raise
            except JobCancelled as e:
                log.info("job %s cancelled before its first token", job_id)
                reporter.finish(
                    Error(e.code, str(e)), JobState.cancelled, **{jobs.ERROR_CODE: e.code, jobs.ERROR_MESSAGE: str(e)}
                )
            except Exception as e:  # job boundary: every failure ends the stream with an error event
                log.exception("job %s failed", job_id)
                code = error_code(e)
                message = str(e) or type(e).__name__
                reporter.finish(Error(code, message), JobState.failed, **{jobs.ERROR_CODE: code, jobs.ERROR_MESSAGE: message})
        except REDIS_DOWN as e:
            self._after_outage(job_id, e)
        finally:
            if reporter is not None:
                reporter.close()
            self.lease.release()
            self.cancels.end()
            try:
                if not self._idle:  # the job ended without a terminal event of its own
                    self._going_idle()
            except REDIS_DOWN as e:  # the next heartbeat says idle; warm routing resumes after the next job
                log.warning("could not list this worker as idle: %s", e)
            self.models.unload_expired()  # keep_alive 0, now that the job's end is out

    def _going_idle(self) -> None:
        """Just before the job's terminal event goes out: the lease is given back (so
        its renewal cannot find it gone and cry "lost"), the model is let go with its
        keep-alive, and the worker is claimable again; a client that sends its next
        request on `end` finds this worker warm."""
        self.lease.release()
        if self._holding is not None:
            self.models.release(*self._holding)
            self._holding = None
        self.presence.idle()
        self._idle = True

    def _check(self) -> None:
        """Between tokens, chunks and layers: stop if the job was taken over or cancelled."""
        if self.lease.lost:
            raise JobAbandoned()
        self.cancels.check()

    def _after_outage(self, job_id: str, error: Exception) -> None:
        """Redis went away mid-job. Wait for it (returning now would leave RQ's own
        bookkeeping to fail and stop the worker), then end the job with a clear
        error, unless a hive's reaper took it over meanwhile (the lease decides,
        as between two reapers) or Redis came back without it."""
        log.warning("job %s: lost Redis (%s); waiting for it to come back", job_id, error)
        down_since = time.monotonic()
        while True:
            try:
                self.redis.ping()
                break
            except REDIS_DOWN:
                time.sleep(OUTAGE_POLL_S)
        outage_s = time.monotonic() - down_since
        if not self.lease.reclaim(job_id):
            log.warning("job %s: Redis is back after %.1f s; a hive has taken the job over", job_id, outage_s)
            return
        message = f"the worker lost its connection to Redis mid-job for {outage_s:.1f} s"
        log.warning("job %s: Redis is back after %.1f s; ending the job with REDIS_UNAVAILABLE", job_id, outage_s)
        # A fresh reporter re-reads where the log stands: some events may not have made it.
        reporter = MeasuredReporter(self.metrics, self.redis, job_id, self.settings.job_ttl_s)
        reporter.finish(
            Error("REDIS_UNAVAILABLE", message),
            JobState.failed,
            **{jobs.ERROR_CODE: "REDIS_UNAVAILABLE", jobs.ERROR_MESSAGE: message},
        )

    def _model(self, request: InferenceRequest, reporter: JobReporter) -> tuple[LoadedModel, bool, float]:
        """The model, loaded and marked in use (the caller releases it)."""
        loaded = self.models.take(request.model, request.revision)
        if loaded is not None:
            return loaded, True, 0.0
        reporter.update(JobState.downloading)
        self.presence.phase("downloading")
        # Fail fast, before the download, when even the smallest the weights can take
        # on the device (stored in fp32, loaded in half precision) exceeds the budget;
        # the exact check, from the safetensors headers, comes before loading.
        folder = fetch_model(
            request.model,
            request.revision,
            reporter.emit,
            self._check,
            lambda n: self.models.check_fits(request.model, n // 2),
            self.metrics.downloaded,
        )
        self._check()
        reporter.update(JobState.loading)
        self.presence.phase("loading")

        def on_layer(p):
            reporter.emit(Loading(p.layers_loaded, p.layers_total, p.vram_mb, p.device))
            self._check()

        loaded = self.models.load(request.model, request.revision, folder, on_layer)
        self.metrics.model_loaded(loaded.load_ms)
        return loaded, False, loaded.load_ms

    def _pull(self, request: PullRequest, reporter: JobReporter) -> None:
        reporter.update(JobState.downloading)
        self.presence.phase("downloading")
        fetch_model(request.model, request.revision, reporter.emit, self._check, on_downloaded=self.metrics.downloaded)
        reporter.finish(End(0, 0.0, 0.0, "pulled"), JobState.completed, **{jobs.TOKENS_OUT: 0, jobs.STOP_REASON: "pulled"})

    def _run(self, job_id: str, request: InferenceRequest, reporter: JobReporter) -> None:
        loaded, warm, load_ms = self._model(request, reporter)
        self._holding = (loaded, request.keep_alive)
        self.presence.phase("busy")
        self._generate(job_id, request, reporter, loaded, warm, load_ms)

    def _generate(
        self, job_id: str, request: InferenceRequest, reporter: JobReporter, loaded: LoadedModel, warm: bool, load_ms: float
    ) -> None:
        self._check()
        reporter.emit(Ready(load_ms, warm))
        prompt_ids = encode_prompt(loaded.tokenizer, request)
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=tuple(request.stop),
        )
        started_at = time.time()
        reporter.emit(Started(job_id, request.model, self.name, started_at), JobState.running, **{jobs.STARTED_AT: started_at})

        delay_s = self.settings.token_delay_ms / 1000
        pieces: list[str] = []
        start = time.perf_counter()
        first_at = start
        stop_reason = "max_tokens"
        count = 0
        for token in generate_tokens(loaded.model, loaded.tokenizer, prompt_ids, params):
            if token.i == 0:
                first_at = time.perf_counter()
                # A job that has produced a token is not retried if its worker is lost.
                reporter.emit(Token(token.text, token.i), **{jobs.FIRST_TOKEN_AT: time.time()})
            else:
                reporter.emit_token(Token(token.text, token.i))
            pieces.append(token.text)
            count = token.i + 1
            if token.stop_reason:
                stop_reason = token.stop_reason
                break
            if self.cancels.cancelled:
                stop_reason = "cancelled"
                break
            if self.lease.lost:
                raise JobAbandoned()
            if delay_s:
                time.sleep(delay_s)
        end_at = time.perf_counter()
        ttft_ms = round((first_at - start) * 1000, 2)
        decode_ms = round((end_at - first_at) * 1000, 2)
        reporter.finish(
            End(count, decode_ms, ttft_ms, stop_reason),
            JobState.cancelled if stop_reason == "cancelled" else JobState.completed,
            **{
                jobs.OUTPUT: "".join(pieces),
                jobs.TOKENS_OUT: count,
                jobs.TTFT_MS: ttft_ms,
                jobs.DECODE_TIME_MS: decode_ms,
                jobs.LOAD_MS: load_ms,
                jobs.STOP_REASON: stop_reason,
                jobs.PROMPT_TOKENS: len(prompt_ids),
            },
        )
