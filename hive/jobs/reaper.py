"""Finding jobs whose worker died, or that waited too long, or that wait on the
own queue of a worker that will not take them soon: no job stays "running" or
"queued" forever, and none waits behind a busy worker.

Workers hold a lease on the job they run (``keys.RUNNING``, renewed every second).
Every hive looks once a second for leases past their deadline; the one whose
ZREM succeeds owns that job and retries it or ends it (JobService.worker_lost).
Deadlines and "now" are both on Redis's clock (shared/clock.py): a worker's host
clock may be off by seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import redis.asyncio as aioredis
import redis.exceptions
from starlette.concurrency import run_in_threadpool

from hive.jobs.service import JobService
from shared import keys

log = logging.getLogger("hive.reaper")

PERIOD_S = 1.0
#: After Redis was away, how long leases are left alone: a renewal period or two more
#: than a lease, so that every live worker has renewed.
LEASE_GRACE_S = keys.LEASE_S + 2 * keys.LEASE_RENEW_S


class Reaper:
    def __init__(self, connection: aioredis.Redis, jobs: JobService):
        self.redis = connection
        self.jobs = jobs
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="hive-reaper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def reap_once(self, leases: bool = True) -> None:
        """``leases``: also end the jobs whose lease ran out (not right after an outage)."""
        timed_out = await run_in_threadpool(self.jobs.expire_waiting)
        if timed_out:
            log.warning("%d jobs waited past the queue-wait limit: ended with TIMEOUT", timed_out)
        await run_in_threadpool(self.jobs.update_positions)
        moved = await run_in_threadpool(self.jobs.hand_on_stranded)
        if moved:
            log.info("%d jobs moved to the shared queue from a busy or dead worker's own queue, or popped for a dead one", moved)
        if not leases:
            return
        for job_id in await self.redis.zrangebyscore(keys.RUNNING, 0, self.jobs.clock.now()):
            if await self.redis.zrem(keys.RUNNING, job_id):  # this hive claimed it
                try:
                    outcome = await run_in_threadpool(self.jobs.worker_lost, job_id)
                except Exception:
                    # Put it back: the next period (of any hive) tries again.
                    await self.redis.zadd(keys.RUNNING, {job_id: self.jobs.clock.now()})
                    raise
                log.warning("job %s: its worker stopped renewing its lease; %s", job_id, outcome)

    async def _run_forever(self) -> None:
        redis_away = False
        # While Redis refuses writes (an outage, a new master waiting for a replica to
        # resync), no worker can renew a lease: once it takes writes again, every worker
        # gets a whole lease period to renew before its jobs count as lost.
        leases_from = 0.0
        while True:
            try:
                await self.reap_once(leases=time.monotonic() >= leases_from)
                if redis_away:
                    log.warning("reaper: Redis answers again")
                    self.jobs.clock.remeasure()  # maybe another master, with another clock
                    leases_from = time.monotonic() + LEASE_GRACE_S
                    redis_away = False
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                # Redis is away (not started yet, restarting): said once, not a traceback a second.
                if not redis_away:
                    log.warning("reaper: Redis unavailable (%s); looking again every %.0f s", e, PERIOD_S)
                    redis_away = True
                leases_from = math.inf
            except Exception:  # reaper loop boundary: log and look again next period
                log.exception("looking for lost workers failed")
            await asyncio.sleep(PERIOD_S)
