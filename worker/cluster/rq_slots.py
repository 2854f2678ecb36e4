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

A slot rides out Redis outages anywhere in RQ's loop (worker/cluster/rq_outages.py), and if
RQ's loop quits anyway without a stop request, the slot starts it again.
"""

from __future__ import annotations

import logging
import threading
import time

from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.timeouts import TimerDeathPenalty

from worker.cluster.rq_outages import REDIS_DOWN, SlotQueue, ride_out, wait_out

log = logging.getLogger("worker.slots")

#: How long a free slot blocks on the queues at a time (RQ's BLPOP): a stop takes
#: at most this long for a slot that is free. RQ's own default is 405 s.
SLOT_WORKER_TTL_S = 35  # RQ's dequeue timeout is its worker TTL less 15 s
#: How long a slot whose RQ loop quit without a stop request pauses before starting it again.
RESTART_PAUSE_S = 1.0
#: How often a failed job's bookkeeping is written again when RQ could not write it.
FAILURE_WRITES = 3


class SlotWorker(SimpleWorker):
    """One slot. Job timeouts by a timer thread (RQ's TimerDeathPenalty): RQ's
    default, SIGALRM, only exists for the main thread, and every slot has one job."""

    death_penalty_class = TimerDeathPenalty
    queue_class = SlotQueue

    def __init__(self, *args, stopping: threading.Event, main: bool, **kwargs):
        super().__init__(*args, worker_ttl=SLOT_WORKER_TTL_S, **kwargs)
        self._stopping = stopping
        self._main = main

    def _ride_out(self, what: str, call, /, *args, **kwargs):
        return ride_out(self.connection, f"worker {self.name}", what, call, *args, **kwargs)

    # RQ's loop, step by step: each waits for Redis and runs again (all may run twice).
    def check_for_suspension(self, burst: bool):
        return self._ride_out("RQ's suspension check", super().check_for_suspension, burst)

    def run_maintenance_tasks(self):
        return self._ride_out("RQ's maintenance", super().run_maintenance_tasks)

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None:  # queued on the caller's pipeline: nothing sent yet
            return super().heartbeat(timeout, pipeline)
        return self._ride_out("RQ's heartbeat", super().heartbeat, timeout)

    def set_state(self, state, pipeline=None):
        if pipeline is not None:
            return super().set_state(state, pipeline)
        return self._ride_out("RQ's worker state", super().set_state, state)

    def get_redis_server_version(self):
        # Asked once, just after a job is popped: RQ's dequeue would retry and drop the job.
        return self._ride_out("RQ's INFO", super().get_redis_server_version)

    def prepare_execution(self, job):
        while True:
            before = set(self.executions)
            try:
                return super().prepare_execution(job)
            except REDIS_DOWN as e:
                # RQ lists the execution before it writes it: unlisted again, so that
                # this slot does not count a job twice (a record written anyway expires).
                for execution_id in set(self.executions) - before:
                    del self.executions[execution_id]
                wait_out(self.connection, f"worker {self.name}", f"RQ's start of job {job.id}", e)

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False):
        return self._ride_out(f"RQ's start of job {job.id}", super().prepare_job_execution, job, remove_from_intermediate_queue)

    def handle_execution_ended(self, job, queue, heartbeat_ttl):
        return self._ride_out(f"RQ's end of job {job.id}", super().handle_execution_ended, job, queue, heartbeat_ttl)

    def handle_job_success(self, job, queue, started_job_registry, execution):
        # Raised out of here, RQ would record the job as failed, then quit on the next error.
        return self._ride_out(
            f"RQ's success bookkeeping of job {job.id}", super().handle_job_success, job, queue, started_job_registry, execution
        )

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        # RQ logs a failure it could not write and goes on ("failed to persist failure"),
        # leaving the job started in its registries: written again while the execution's
        # record, which that write deletes, is still there.
        what = f"RQ's failure bookkeeping of job {job.id}"
        for _ in range(FAILURE_WRITES):
            self._ride_out(what, super().handle_job_failure, job, queue, started_job_registry, exc_string, execution)
            if execution is None or not self._ride_out(what, self.connection.exists, execution.key):
                return
        log.error("worker %s: could not record the failure of job %s in RQ's registries", self.name, job.id)

    def register_birth(self):
        return self._ride_out("RQ's worker list", super().register_birth)

    def subscribe(self):
        return self._ride_out("RQ's command channel", super().subscribe)

    def unsubscribe(self):
        # RQ sends UNSUBSCRIBE, then stops its command listener. A listener that reads the
        # confirmation in between goes back to wait, up to RQ's sleep_time (60 s), for a
        # subscription that never comes, and RQ's stop() waits for it: a worker told to
        # stop took over 15 s to exit in 2 of 9 runs of tests/test_worker_failures.py.
        # The flag cleared first, the confirmation ends the listener's loop.
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop(timeout=0)
        super().unsubscribe()

    def teardown(self):
        try:
            super().teardown()
        except REDIS_DOWN as e:  # RQ's record of this slot expires by itself
            log.warning("worker %s: could not leave RQ's worker list: %s", self.name, e)
            if self.pubsub_thread is not None:  # what RQ did not reach: its command listener stops
                self.pubsub_thread.stop(timeout=1)
                self.pubsub.close()

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
    def __init__(self, count: int, queues: list[SlotQueue], connection, serializer, name: str):
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

    def _work(self, worker: SlotWorker) -> None:
        """RQ's loop, started again if it quits without a stop request: after an
        error its steps do not wait out (RQ has logged it with its traceback)."""
        while True:
            worker.work(with_scheduler=False, logging_level="WARNING")
            if self.stopping.is_set() or worker._stop_requested:
                return
            log.error("worker %s: RQ's loop quit unasked; starting it again", worker.name)
            try:
                time.sleep(RESTART_PAUSE_S)  # a fault that recurs at once is not a busy loop
                # Its record must read dead before RQ registers the slot again.
                worker._ride_out("RQ's worker list", worker.register_death)
            except StopRequested:  # SIGTERM meanwhile
                return
