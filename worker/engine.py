"""Continuous batching: one engine per loaded model runs every job on that model
in one batch, on a thread of its own.

Each step: jobs that were cancelled, timed out or taken over leave; the scheduler
admits newcomers (one prefill group, or one chunk of a long prompt); then one
decode step runs for the whole batch; every job's sampled token goes to its own
``Sequence`` (its sampling, stop sequences, limits); the step's tokens leave as one
Redis pipeline; jobs that ended leave the batch and their threads are woken to
write the terminal event. A job joins at the next step after it arrives, and a job
that ends leaves at once.

The job's own RQ slot thread (worker/runtime.py) waits on ``job.done``; between
``submit`` and ``done`` only the engine writes to the job's stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
import torch

from shared.events import Token

from .batch import DecodeBatch, Prefilled, PromptChunks
from .running import Outcome, RunningJob
from .scheduler import Scheduler, kv_bytes_per_token
from .step_writer import StepWriter

log = logging.getLogger(__name__)

#: Redis could not be reached, even after the client's own retries.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

#: Prompt tokens one step prefills: a step with a prefill delays the running
#: streams' next token by about that prefill's time (bench/batching.py measures
#: the inter-token p99). A GPU prefills many more tokens in the same time.
PREFILL_TOKENS = {"cpu": 128, "cuda": 512}
#: How long the engine waits before looking again when jobs wait and none can run.
IDLE_WAIT_S = 0.05


class BatchMetrics:
    """What the engine reports (worker/metrics.py implements it)."""

    def batch_changed(self, model: str, size: int, kv_bytes: int) -> None: ...
    def admitted(self, job: RunningJob) -> None: ...
    def sent(self, commands: int) -> None: ...


class Engine:
    def __init__(
        self,
        model,
        name: str,
        writer_connection: redis.Redis,
        max_batch: int,
        kv_budget: Callable[[], int],
        metrics: BatchMetrics,
        token_delay_s: float = 0.0,
    ):
        self.name = name
        self.batch = DecodeBatch(model)
        device_type = self.batch.device.type
        self.scheduler = Scheduler(max_batch, PREFILL_TOKENS.get(device_type, 512), kv_bytes_per_token(model), kv_budget)
        self._writer = StepWriter(writer_connection)
        self._metrics = metrics
        self._delay_s = token_delay_s
        self._chunking: tuple[RunningJob, PromptChunks] | None = None
        #: Admitted this step, not yet in the batch (their prefill may fail).
        self._joining: list[RunningJob] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"hive-engine-{name}", daemon=True)
        self._thread.start()

    # The job threads' side.

    def submit(self, job: RunningJob) -> None:
        """Queues the job for the batch (the caller checked it can fit:
        ``scheduler.check_fits_alone``, before the job's `started`)."""
        job.submitted_at = time.perf_counter()
        with self._wake:
            self.scheduler.waiting.append(job)
            self._wake.notify()

    def poke(self) -> None:
        """A job was cancelled or timed out: check now rather than at the next step."""
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    @property
    def running(self) -> int:
        return len(self.batch) + (self._chunking is not None)

    @property
    def kv_bytes(self) -> int:
        """What the batch's cache takes now (the reservation may be more)."""
        return self.batch.cache_bytes

    # The engine's thread.

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self.scheduler.waiting or self.batch.rows or self._chunking):
                    self._wake.wait()
                if self._stopped:
                    break
            try:
                worked = self._step()
            except REDIS_DOWN as e:
                log.warning("engine %s: lost Redis (%s); ending the batch's jobs", self.name, e)
                self._fail_all(e)
                worked = False
            except Exception as e:  # step boundary: a forward that failed (out of memory, a bug) fails its batch
                log.exception("engine %s: a step failed; ending the batch's jobs", self.name)
                self._fail_all(e)
                worked = False
            if not worked:
                # Jobs wait for room (another model's batch holds it) and none runs
                # here: look again shortly rather than spin (a cancel is seen then too).
                with self._wake:
                    self._wake.wait(IDLE_WAIT_S)
        self._writer.close()
        self._fail_all(RuntimeError("the model was unloaded"))

    def _fail_all(self, error: BaseException) -> None:
        """Ends every job of the batch with ``error``; waiting jobs keep waiting
        (they have written nothing yet), unless the engine stops."""
        jobs = [*self.batch.rows, *(j for j in self._joining if j not in self.batch.rows)]
        self._joining = []
        if self._chunking is not None and self._chunking[0] not in jobs:
            jobs.append(self._chunking[0])
        self._chunking = None
        self.batch.filter([])
        self._writer.close()
        if self._stopped:
            with self._wake:
                jobs.extend(self.scheduler.waiting)
                self.scheduler.waiting.clear()
        for job in jobs:
            job.end(Outcome(error=error))
        self._changed()

    def _changed(self) -> None:
        self._metrics.batch_changed(self.name, self.running, self.kv_bytes)

    def _leave_stopped(self) -> None:
        """Jobs stopped from outside (cancel, timeout, lease lost) leave before the step."""
        with self._wake:
            for job in [j for j in self.scheduler.waiting if j.should_stop]:
                self.scheduler.waiting.remove(job)
                job.end(Outcome(job.should_stop))
        if self._chunking is not None and self._chunking[0].should_stop:
            job, self._chunking = self._chunking[0], None
            job.end(Outcome(job.should_stop))
        stopped = [(r, job.should_stop) for r, job in enumerate(self.batch.rows) if job.should_stop]
        if stopped:
            self._writer.flush()  # their last tokens are in before their threads write the end
            gone = {r for r, _ in stopped}
            leaving = [(self.batch.rows[r], why) for r, why in stopped]
            self.batch.filter([r for r in range(len(self.batch.rows)) if r not in gone])
            for job, why in leaving:
                job.end(Outcome(why))
            self._changed()

    def _admit(self) -> tuple[list[RunningJob], Prefilled | None]:
        """One prefill op: the next chunk of a long prompt, or a new group."""
        if self._chunking is not None:
            job, chunks = self._chunking
            prefilled = self.batch.prefill_chunk(chunks, self.scheduler.budget(len(self.batch.rows)))
            if prefilled is None:
                return [], None
            self._chunking, self._joining = None, [job]
            return [job], prefilled
        with self._wake:
            group = self.scheduler.admit(self.batch.rows)
        if not group:
            return [], None
        self._joining = group
        now = time.perf_counter()
        for job in group:
            job.admitted_at = now
            job.phase = "running"
            self._metrics.admitted(job)
        if len(group) == 1 and len(group[0].sequence.prompt_ids) > self.scheduler.step_budget:
            self._chunking, self._joining = (group[0], PromptChunks(group[0].sequence.prompt_ids)), []
            return self._admit()
        return group, self.batch.prefill([j.sequence.prompt_ids for j in group])

    def _step(self) -> bool:
        """One step; whether it ran a forward pass."""
        self._leave_stopped()
        commands: list[bytes] = []
        ended: dict[int, tuple[RunningJob, str]] = {}  # by batch row
        joined, prefilled = self._admit()
        if prefilled is not None:
            first_ids, stops = self._sample(joined, prefilled.logits, commands)
            offset = len(self.batch.rows)
            ended.update({offset + k: (joined[k], why) for k, why in stops})
            self.batch.join(joined, prefilled, first_ids)
            self._joining = []
            self._changed()
            # The newcomers' first tokens go out now, not after this step's decode.
            self._send(commands)
            commands = []
        # Every row decodes, but for those that ended with their first token.
        decoding = [r for r in range(len(self.batch.rows)) if r not in ended]
        if decoding:
            logits = self.batch.decode()
            if len(decoding) < len(self.batch.rows):
                logits = logits[decoding]
            picked, stops = self._sample([self.batch.rows[r] for r in decoding], logits, commands)
            ids = self.batch.next_ids.tolist()
            for k, r in enumerate(decoding):
                ids[r] = picked[k]
            self.batch.feed(ids)
            ended.update({decoding[k]: (self.batch.rows[decoding[k]], why) for k, why in stops})
        self._send(commands)
        if ended:
            self._writer.flush()  # in Redis before the jobs' threads write their ends
            self.batch.filter([r for r in range(len(self.batch.rows)) if r not in ended])
            for job, why in ended.values():
                job.end(Outcome(why))
            self._changed()
        if self._delay_s:
            time.sleep(self._delay_s)
        return prefilled is not None or bool(decoding) or self._chunking is not None

    def _send(self, commands: list[bytes]) -> None:
        self._writer.send(commands)
        self._metrics.sent(len(commands))

    @staticmethod
    def _sample(jobs: list[RunningJob], logits: torch.Tensor, commands: list[bytes]) -> tuple[list[int], list[tuple[int, str]]]:
        """One token per job from its logits row, handed to its sequence and packed
        into ``commands``; returns the ids, and (index, stop reason) of those that ended."""
        greedy = logits.argmax(-1).tolist()  # one call for the whole batch
        now = time.perf_counter()
        ids, stops = [], []
        for k, job in enumerate(jobs):
            sequence = job.sequence
            token_id = greedy[k] if sequence.params.greedy else sequence.sample(logits[k])
            ids.append(token_id)
            step = sequence.accept(token_id)
            if step.i == 0:
                job.first_at = now
            job.pieces.append(step.text)
            commands.extend(job.reporter.token_commands(Token(step.text, step.i)))
            if step.stop_reason:
                stops.append((k, step.stop_reason))
        return ids, stops
