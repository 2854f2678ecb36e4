"""Continuous batching: one engine per loaded model runs every job on that model
in one batch, on a thread of its own.

Each step: jobs that were cancelled, timed out or taken over leave; the scheduler
decides who joins and which prompt chunks are prefilled; then one forward pass
computes every decoding job's next token and the prompt chunks together
(worker/engine/batch.py); every job that got logits has its token sampled by its own
``Sequence`` (its sampling, stop sequences, limits); the step's tokens leave as
one Redis pipeline; jobs that ended leave the batch and their threads are woken
to write the terminal event. A job joins at the next step after it arrives, and a
job that ends leaves at once.

The job's own RQ slot thread (worker/runtime.py) waits on ``job.done``; between
``add_job`` and ``done`` only the engine writes to the job's stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
import torch

from shared.connections import REDIS_DOWN
from shared.events import Token
from worker.engine.batch import Row
from worker.engine.running_job import Outcome, RunningJob
from worker.engine.scheduler import Scheduler
from worker.engine.self_check import batch_for
from worker.engine.step_writer import StepWriter
from worker.grammar.constraint import apply_mask, masks_for
from worker.kv.prefix import default_cap

log = logging.getLogger("worker.engine")

#: Prompt tokens one step prefills beside the decode, before the scheduler scales it
#: (``Scheduler.budget``): a chunk delays the running streams' next token by about
#: its compute, ~2 ms a token for the 135M-shaped model on this project's CPU, and
#: 64 kept the inter-token p99 under 3× its p50 where 128 did not (bench/batching.py,
#: Poisson arrivals). A GPU computes many more tokens in the same time.
PREFILL_TOKENS = {"cpu": 64, "cuda": 512}
#: How long the engine waits before looking again when jobs wait and none can run.
IDLE_WAIT_S = 0.05
#: How long an idle engine lets a burst gather before its first prefill (``_gather``),
#: so that a burst is prefilled in one step rather than its first job alone and the
#: rest a whole step later (bench/batching.py: the first token at N = 4); the
#: first token of a job that comes alone waits GATHER_MIN_S more.
GATHER_MIN_S = 0.01
GATHER_S = 0.05


class BatchMetrics:
    """What the engine reports (worker/metrics.py implements it)."""

    def batch_changed(self, model: str, size: int, kv_bytes: int) -> None: ...
    def stepped(self, model: str, used_bytes: int, prefix_queries: int, prefix_hits: int, preempted: int) -> None: ...
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
        arriving: Callable[[], int] = lambda: 0,
        prefix_seed: str | None = None,
        reclaim: Callable[[int], int] = lambda nbytes: 0,
        prefix_cap: int = 0,
    ):
        """``arriving``: how many jobs for this model the worker has taken and not yet
        added. ``prefix_seed``: the model's identity (repository, revision, dtype) for
        its prefix cache; None turns prefix caching off. ``reclaim``: frees other
        models' cached prefix blocks (bytes wanted → freed). ``prefix_cap``: the most
        the prefix cache holds; 0: worker/kv/prefix.py's default for the device."""
        self.name = name
        self._arriving = arriving
        self.batch = batch_for(model, prefix_seed)
        # The prefix cache may hold what the budget leaves beside the rows' reservation.
        prefix_cap = prefix_cap or default_cap(self.batch.device)
        self.batch.prefix_room = lambda: max(0, min(prefix_cap, kv_budget() - self.batch.reserved_bytes))
        self._counted = (0, 0, 0)  # the prefix cache's queries and hits, and the preemptions, last reported
        self.scheduler = Scheduler(max_batch, PREFILL_TOKENS.get(self.batch.device.type, 512), kv_budget, reclaim)
        self._writer = StepWriter(writer_connection)
        self._metrics = metrics
        self._delay_s = token_delay_s
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"hive-engine-{name}", daemon=True)
        self._thread.start()

    # The job threads' side.

    def add_job(self, job: RunningJob) -> None:
        """Queues the job for the batch (the caller checked it can fit:
        ``check_fits_alone``, before the job's `started`)."""
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

    def check_fits_alone(self, job: RunningJob) -> None:
        """Raises ContextTooLarge for a job this worker's memory could never hold."""
        self.scheduler.check_fits_alone(job, self.batch)

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def kv_reserved(self) -> int:
        """The bytes the batch's cache has reserved and its prefix cache holds (what
        the memory budget counts)."""
        prefix = self.batch.prefix
        return self.batch.reserved_bytes + (prefix.bytes if prefix is not None else 0)

    def reclaim(self, nbytes: int) -> int:
        """Drops cached prefix blocks (least recently used first) to free ``nbytes`` for
        another model; returns the bytes freed. Safe from any thread."""
        return self.batch.prefix.evict(nbytes) if self.batch.prefix is not None else 0

    # The engine's thread.

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self.scheduler.waiting or len(self.batch)):
                    self._wake.wait()
                if self._stopped:
                    break
            self._gather()
            try:
                worked = self._step()
                if not len(self.batch):
                    self._writer.release()  # an idle engine holds no connection of the pool's
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

    def _gather(self) -> None:
        """With no row decoding, the first step's prefill waits for a burst to gather:
        at least GATHER_MIN_S after the oldest waiting job arrived (the jobs of a
        burst reach the engine over a few milliseconds, through RQ's slots), and up
        to GATHER_S while jobs this worker has taken are still on their way (each
        wakes the engine as it is added)."""
        if self.batch.decoding:
            return
        with self._wake:
            if not self.scheduler.waiting:
                return
            oldest = self.scheduler.waiting[0].submitted_at
            while not self._stopped:
                now = time.perf_counter()
                if now >= oldest + GATHER_S or (now >= oldest + GATHER_MIN_S and not self._arriving()):
                    return
                self._wake.wait((oldest + (GATHER_MIN_S if now < oldest + GATHER_MIN_S else GATHER_S)) - now)

    def _fail_all(self, error: BaseException) -> None:
        """Ends every job of the batch with ``error``; waiting jobs keep waiting
        (they have written nothing yet), unless the engine stops."""
        jobs = self.batch.owners
        self.batch.clear()
        self.scheduler.shrink(self.batch)
        self._writer.close()
        if self._stopped:
            with self._wake:
                jobs.extend(self.scheduler.waiting)
                self.scheduler.waiting.clear()
        for job in jobs:
            job.end(Outcome(error=error))
        self._changed()

    def _changed(self) -> None:
        self._metrics.batch_changed(self.name, self.running, self.batch.allocated_bytes)

    def _leave(self, leaving: list[tuple[Row, str | Exception]]) -> None:
        """Slots leave the batch, and their jobs' threads take over with ``why``: a stop
        reason, or the error that ended the job alone."""
        self._writer.flush()  # their last tokens are in Redis before their threads write the end
        for row, _ in leaving:
            self.batch.remove(row)
        self.scheduler.shrink(self.batch)
        for row, why in leaving:
            row.owner.end(Outcome(why) if isinstance(why, str) else Outcome(error=why))
        self._changed()

    def _leave_stopped(self) -> None:
        """Jobs stopped from outside (cancel, timeout, lease lost) leave before the step."""
        with self._wake:
            for job in [j for j in self.scheduler.waiting if j.should_stop]:
                self.scheduler.waiting.remove(job)
                job.end(Outcome(job.should_stop))
        stopped = [(row, row.owner.should_stop) for row in self.batch.rows if row.owner.should_stop]
        if stopped:
            self._leave(stopped)

    def _step(self) -> bool:
        """One step; whether it ran a forward pass."""
        self._leave_stopped()
        with self._wake:
            joining, chunks = self.scheduler.plan(self.batch)
        if joining:
            now = time.perf_counter()
            for job in joining:
                job.phase = "running"
                if not job.admitted_at:  # not a preempted job coming back
                    job.admitted_at = now
                    self._metrics.admitted(job)
            self._changed()
        if not chunks and not self.batch.decoding:
            return False
        rows, logits = self.batch.forward(chunks)
        commands: list[bytes] = []
        ids, stops = self._sample([row.owner for row in rows], logits, commands)
        for row, token_id in zip(rows, ids):
            self.batch.feed(row, token_id)
        self._send(commands)
        if stops:
            self._leave([(rows[k], why) for k, why in stops])
        self._count()
        if self._delay_s:
            time.sleep(self._delay_s)
        return True

    def _count(self) -> None:
        prefix = self.batch.prefix
        counts = (prefix.queries, prefix.hits, self.scheduler.preempted) if prefix is not None else (0, 0, self.scheduler.preempted)
        self._metrics.stepped(self.name, self.batch.used_bytes, *(now - before for now, before in zip(counts, self._counted)))
        self._counted = counts

    def _send(self, commands: list[bytes]) -> None:
        self._writer.send(commands)
        self._metrics.sent(len(commands))

    @staticmethod
    def _masked(jobs: list[RunningJob], logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """The rows of the jobs with a grammar, masked in one operation (their masks
        are computed row by row, the logits touched once): index → masked row."""
        constrained = [k for k, job in enumerate(jobs) if job.sequence.constraint is not None]
        if not constrained:
            return {}
        rows = logits[constrained].float()
        apply_mask(rows, masks_for([jobs[k].sequence.constraint for k in constrained], logits.shape[-1]))
        return {k: rows[j] for j, k in enumerate(constrained)}

    @staticmethod
    def _sample(jobs: list[RunningJob], logits: torch.Tensor, commands: list[bytes]) -> tuple[list[int], list[tuple[int, str | Exception]]]:
        """One token per job from its logits row, handed to its sequence and packed
        into ``commands``; returns the ids, and (index, stop reason) of those that ended."""
        greedy = logits.argmax(-1).tolist()  # one call for the whole batch
        masked = Engine._masked(jobs, logits)
        now = time.perf_counter()
        ids, stops = [], []
        for k, job in enumerate(jobs):
            sequence = job.sequence
            token_id = greedy[k]
            try:
                if not sequence.plain:
                    token_id = sequence.sample(logits[k], masked.get(k))
                step = sequence.accept(token_id)
            except Exception as e:  # one row's sampling (its grammar, its penalties) ends its job, not the batch
                log.exception("job %s: sampling failed; ending it alone", job.job_id)
                ids.append(token_id)
                stops.append((k, e))
                continue
            ids.append(token_id)
            if step.i == 0:
                job.first_at = now
            job.pieces.append(step.text)
            if step.text or step.logprobs or not step.tool_calls:
                commands.extend(job.reporter.token_commands(Token(step.text, step.i, step.logprobs)))
            for delta in step.tool_calls:
                commands.extend(job.reporter.token_commands(delta))
            if step.stop_reason:
                stops.append((k, step.stop_reason))
        return ids, stops
