"""The jobs a worker runs: one ``RunningJob`` per job, and the registry of them.

A worker with a batching engine runs many jobs at once. Everything that belongs to
one of them lives on its object (its reporter, cancel flag, lease state, the model
it holds, its sequence in the batch, how it ended) rather than in per-worker
holders: the cancel listener, the lease renewal and the heartbeat each walk the
registry, and the engine owns a job's stream between ``started`` and its end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from worker.engine.sequence import Sequence


class JobAbandoned(Exception):
    """A hive's reaper took the job over: this worker must not write to it again."""


class JobCancelled(Exception):
    code = "CANCELLED"


@dataclass
class Outcome:
    """How a job's generation ended, as the engine leaves it for the job's thread."""

    #: max_tokens | eos | stop_sequence | cancelled | abandoned | timeout, or "" on an error.
    stop_reason: str = ""
    error: BaseException | None = None


@dataclass(eq=False)
class RunningJob:
    job_id: str
    model: str
    #: What /v1/workers shows: taken, downloading, loading, waiting (for a slot in
    #: the batch), running.
    phase: str = "taken"
    reporter: object = None
    #: (LoadedModel, keep_alive) while the job uses the model; released once.
    holding: tuple | None = None
    sequence: Sequence | None = None
    #: Whose cached prefixes it may reuse (worker/kv/prefix.py); None: it
    #: neither reads nor leaves any. Its row in the batch, once admitted.
    cache_salt: str | None = None
    row: object = None
    #: Preempted (worker/engine/scheduler.py): the tokens to recompute and the token
    #: that follows them, until it is back in the batch.
    resume: tuple[list[int], int | None] | None = None
    #: Set by the cancel listener (a DELETE), by RQ's timeout, or by the lease renewal.
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    timed_out: threading.Event = field(default_factory=threading.Event)
    #: The lease was given back (just before the terminal event): no more renewals.
    released: bool = False
    #: Filled by the engine: text, timings and the end.
    pieces: list[str] = field(default_factory=list)
    submitted_at: float = 0.0  # perf_counter, when the engine got it
    admitted_at: float = 0.0  # when its prefill began
    first_at: float = 0.0
    ended_at: float = 0.0
    outcome: Outcome | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Between chunks and layers (download, load): stop if the job was taken over or cancelled."""
        if self.lost.is_set():
            raise JobAbandoned()
        if self.cancelled.is_set():
            raise JobCancelled("cancelled by the client")

    @property
    def should_stop(self) -> str | None:
        """Checked by the engine before each step: why this job leaves the batch now."""
        if self.lost.is_set():
            return "abandoned"
        if self.timed_out.is_set():
            return "timeout"
        if self.cancelled.is_set():
            return "cancelled"
        return None

    def end(self, outcome: Outcome) -> None:
        """The engine lets go of the job: from here on only the job's thread writes to it."""
        self.ended_at = time.perf_counter()
        self.outcome = outcome
        self.done.set()

    @property
    def tokens(self) -> int:
        return self.sequence.count if self.sequence is not None else 0

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache rather than computed."""
        return self.row.cached if self.row is not None else 0


class RunningJobs:
    """Thread-safe: jobs come and go on RQ's slot threads; the listeners, the lease
    renewal, the heartbeat and the engine read."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._jobs: dict[str, RunningJob] = {}
        self._lock = threading.Lock()

    def add(self, job: RunningJob) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    def remove(self, job: RunningJob) -> None:
        with self._lock:
            if self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]

    def get(self, job_id: str) -> RunningJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[RunningJob]:
        with self._lock:
            return list(self._jobs.values())

    def active(self) -> list[RunningJob]:
        """The jobs that hold a slot: taken and not yet given back (a job gives its
        slot back just before its terminal event)."""
        with self._lock:
            return [job for job in self._jobs.values() if not job.released]

    @property
    def free(self) -> int:
        return max(self.capacity - len(self.active()), 0)
