"""A worker's slots: one RQ worker per job it can run at once, each on a thread of
its own, all in this one process and sharing its loaded models and batches.

RQ's worker runs one job at a time and keeps its bookkeeping for that job: the
job's status, the started and finished registries, the worker's own state and
heartbeat. A worker with ``--max-batch N`` is N RQ workers (``<name>``,
``<name>#1`` … ``<name>#N-1``): each takes a job when its slot is free and keeps
RQ's records true for it while the job runs in the model's batch, so ``rq info``
shows N workers, one busy per running job. The first runs on the main thread and
takes the process's signals; the others stop with it.

Non-forking (``SimpleWorker``): RQ's default worker forks a child per job, which
would drop the loaded models with the child (and CUDA does not survive a fork).
"""

from __future__ import annotations

import logging
import threading

from rq import SimpleWorker
from rq.timeouts import TimerDeathPenalty

log = logging.getLogger(__name__)

#: How long a free slot blocks on the queues at a time (RQ's BLPOP): a stop takes
#: at most this long for a slot that is free. RQ's own default is 405 s.
SLOT_WORKER_TTL_S = 35  # RQ's dequeue timeout is its worker TTL less 15 s


class SlotWorker(SimpleWorker):
    """One slot. Job timeouts by a timer thread (RQ's TimerDeathPenalty): RQ's
    default, SIGALRM, only exists for the main thread, and every slot has one job."""

    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args, stopping: threading.Event, main: bool, **kwargs):
        super().__init__(*args, worker_ttl=SLOT_WORKER_TTL_S, **kwargs)
        self._stopping = stopping
        self._main = main

    def _install_signal_handlers(self):
        if self._main:  # signals reach the main thread only
            super()._install_signal_handlers()

    def request_stop(self, signum, frame):
        """A warm stop of the whole worker: every slot ends its job, then stops."""
        self._stopping.set()
        super().request_stop(signum, frame)

    def execute_job(self, job, queue):
        if self._stopping.is_set():
            # Taken as the worker stops: back to the front of its queue, untouched
            # (RQ has not marked it started yet), for another worker.
            queue.connection.lpush(queue.key, job.id)
            self._stop_requested = True
            return
        super().execute_job(job, queue)


class Slots:
    def __init__(self, count: int, queues, connection, serializer, name: str):
        self.stopping = threading.Event()
        self.workers = [
            SlotWorker(
                queues, connection=connection, serializer=serializer, name=name if k == 0 else f"{name}#{k}",
                stopping=self.stopping, main=k == 0,
            )
            for k in range(count)
        ]
        self._threads: list[threading.Thread] = []

    def work(self) -> None:
        """Runs every slot until the worker is stopped (SIGTERM, SIGINT), then waits
        for the jobs still running."""
        for worker in self.workers[1:]:
            thread = threading.Thread(target=self._work, args=(worker,), name=f"hive-slot-{worker.name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self._work(self.workers[0])
        finally:
            self.stopping.set()
            for worker, thread in zip(self.workers[1:], self._threads):
                worker._stop_requested = True
                if worker.executions:  # RQ 3: this thread's job; get_current_job_id() would ask Redis when idle
                    thread.join()  # its job ends first (a warm stop)
                elif thread.is_alive():
                    worker.register_death()  # waiting on the queues: off RQ's list now

    @staticmethod
    def _work(worker: SlotWorker) -> None:
        worker.work(with_scheduler=False, logging_level="WARNING")
