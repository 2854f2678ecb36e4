"""Jobs stranded behind a dead worker (hive/jobs/stranded.py) against a real
redis-server: the pops a cut-off worker's slots leave waiting in Redis are released,
and the jobs they took go back to the shared queue under a new RQ id."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
from rq.job import Job

from hive.jobs.service import JobService
from hive.jobs.stranded import POPPED_FOR_S, StrandedJobs
from shared import job_record, keys
from shared.clock import RedisClock
from shared.connections import async_client
from shared.settings import Settings
from shared.spec import InferenceRequest, PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]


class Clock:
    """Redis's clock as the hive reads it, moved on by the test instead of waited for."""

    def __init__(self, connection: redis.Redis):
        seconds, microseconds = connection.time()
        self._offset = seconds + microseconds / 1e6 - time.time()

    def now(self) -> float:
        return time.time() + self._offset

    def pass_by(self, seconds: float) -> None:
        self._offset += seconds


def submit(redis_url: str, queue: str, request) -> str:
    async def run():
        connection = async_client(redis_url, decode_responses=True)
        sync_connection = redis.Redis.from_url(redis_url)
        clock = RedisClock(sync_connection)
        clock.measure()
        try:
            return (await JobService(Settings(queue=queue), connection, sync_connection, clock).submit(request, "owner")).job_id
        finally:
            await connection.aclose()
            sync_connection.close()

    return asyncio.run(run())


def waiting_pop(connection: redis.Redis, *queue_keys: str):
    """A slot's BLPOP whose reply is not read, as Redis sees one of a host cut off."""
    pop = connection.connection_pool.make_connection()
    pop.send_command("BLPOP", *queue_keys, 0)
    return pop


@pytest.fixture()
def queue() -> str:
    return f"hive:test-stranded-{uuid.uuid4().hex[:8]}"


def test_jobs_popped_for_a_cut_off_worker_go_back_under_a_new_rq_id(redis_url, queue):
    """Three free slots of a worker wait on [its own queue, the shared one]; a job routed
    warm to it and a job on the shared queue go to two of them, whose replies never
    arrive. Found dead, the worker's last waiting pop is released, and both jobs are
    put back a moment later, each under a new RQ id, so a late reply runs nothing."""
    db = redis.Redis.from_url(redis_url)
    name = "gpu-cut:cpu:1"
    own, shared = f"rq:queue:{keys.worker_queue(queue, name)}", f"rq:queue:{queue}"
    pops = [waiting_pop(db, own, shared) for _ in range(3)]
    clock = Clock(db)
    db.zadd(keys.workers(queue), {name: clock.now()})
    db.hset(keys.worker(name), mapping={"capacity": 4, "running": 1})
    db.zadd(keys.idle_with(queue, "acme/tiny", None), {name: clock.now()})
    warm = submit(redis_url, queue, InferenceRequest(model="acme/tiny", prompt="x"))
    pull = submit(redis_url, queue, PullRequest(model="acme/other"))  # pulls always go on the shared queue
    assert db.hget(keys.job(warm), job_record.RQ_QUEUE).decode() == keys.worker_queue(queue, name)
    assert (db.llen(own), db.llen(shared), db.get(keys.worker_claims(name))) == (0, 0, b"1")  # popped, on no queue

    stranded = StrandedJobs(db, queue, clock)
    assert stranded.hand_on() == 0  # alive yet
    clock.pass_by(keys.WORKER_DEAD_AFTER_S + 0.1)
    assert stranded.hand_on() == 0  # found dead: its last waiting pop released, the jobs noted
    assert pops[2].read_response() == [own.encode(), keys.NO_JOB.encode()]
    assert db.llen(own) == 0  # the NO_JOB ids no pop took are gone
    assert sorted(db.zrange(keys.popped(queue), 0, -1)) == sorted([warm.encode(), pull.encode()])

    clock.pass_by(POPPED_FOR_S)
    assert stranded.hand_on() == 2
    rq_ids = {job_id: db.hget(keys.job(job_id), job_record.RQ_ID).decode() for job_id in (warm, pull)}
    assert all(rq_id.startswith(f"{job_id}-") for job_id, rq_id in rq_ids.items())
    assert sorted(db.lrange(shared, 0, -1)) == sorted(rq_id.encode() for rq_id in rq_ids.values())
    for job_id, rq_id in rq_ids.items():
        assert db.hget(keys.job(job_id), job_record.RQ_QUEUE).decode() == queue
        assert db.hget(Job.key_for(rq_id), "origin").decode() == queue
        assert not db.exists(Job.key_for(job_id))  # what the late replies name is gone
    assert db.get(keys.worker_claims(name)) == b"0" and db.zcard(keys.popped(queue)) == 0
    late = sorted(pop.read_response() for pop in pops[:2])
    assert late == sorted([[own.encode(), warm.encode()], [shared.encode(), pull.encode()]])


def test_a_job_a_live_worker_is_taking_as_another_dies_is_left_to_it(redis_url, queue):
    db = redis.Redis.from_url(redis_url)
    clock = Clock(db)
    db.zadd(keys.workers(queue), {"gpu-gone:cpu:1": clock.now() - 60})  # killed outright: no pop left waiting
    job_id = submit(redis_url, queue, InferenceRequest(model="acme/tiny", prompt="x"))
    assert db.lpop(f"rq:queue:{queue}") == job_id.encode()  # a live worker's pop
    stranded = StrandedJobs(db, queue, clock)
    assert stranded.hand_on() == 0
    assert db.zrange(keys.popped(queue), 0, -1) == [job_id.encode()]
    # Its take (worker/cluster/reporter.py): the job leaves the waiting sets, running.
    db.zrem(keys.queued(queue), job_id)
    db.hset(keys.job(job_id), job_record.STATE, "running")
    clock.pass_by(POPPED_FOR_S)
    assert stranded.hand_on() == 0
    assert db.hget(keys.job(job_id), job_record.RQ_ID).decode() == job_id and db.exists(Job.key_for(job_id))
    assert db.llen(f"rq:queue:{queue}") == 0 and db.zcard(keys.popped(queue)) == 0
