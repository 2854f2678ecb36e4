"""The submit script against a real redis-server: what it writes is what RQ itself
would write, the record survives any text, limits hold, and warm claims route."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from hive.jobs.service import JobService
from hive.jobs.submit import QueueFull
from shared import job_record, keys
from shared.clock import RedisClock
from shared.connections import async_client
from shared.settings import Settings
from shared.spec import InferenceRequest, PullRequest
from tests import processes, sse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]

TIMESTAMPS = {b"created_at", b"enqueued_at"}


def submit(redis_url: str, settings: Settings, request) -> tuple[str, int]:
    async def run():
        connection = async_client(redis_url, decode_responses=True)
        sync_connection = redis.Redis.from_url(redis_url)
        clock = RedisClock(sync_connection)
        clock.measure()
        try:
            submitted = await JobService(settings, connection, sync_connection, clock).submit(request, "owner")
            return submitted.job_id, submitted.position
        finally:
            await connection.aclose()
            sync_connection.close()

    return asyncio.run(run())


@pytest.fixture()
def queue() -> str:
    return f"hive:test-submit-{uuid.uuid4().hex[:8]}"


def test_the_rq_job_is_the_one_enqueue_call_writes(redis_url, queue):
    connection = redis.Redis.from_url(redis_url)
    request = InferenceRequest(model="acme/tiny", prompt='héllo 😀 "quoted" \\ \n', max_tokens=3)
    job_id, position = submit(redis_url, Settings(queue=queue), request)
    assert position == 1
    # The reference: the same job through RQ's own enqueue_call.
    reference = Queue(queue + "-ref", connection=connection, serializer=JSONSerializer).enqueue_call(
        job_record.RUN_INFERENCE, args=(job_id, request.model_dump(mode="json")), job_id="ref" + job_id,
        timeout=Settings().job_timeout_s, result_ttl=0, failure_ttl=Settings().job_ttl_s,
    )
    ours = connection.hgetall(Job.key_for(job_id))
    theirs = connection.hgetall(reference.key)
    assert ours.keys() == theirs.keys()
    differing = {k for k in ours if ours[k] != theirs[k]} - TIMESTAMPS
    assert differing == {b"origin"}  # the queue
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert (job.func_name, list(job.args), job.origin, job.get_status()) == (job_record.RUN_INFERENCE, [job_id, request.model_dump(mode="json")], queue, "queued")
    assert connection.lrange(f"rq:queue:{queue}", 0, -1) == [job_id.encode()]
    assert f"rq:queue:{queue}".encode() in connection.smembers("rq:queues")
    record = {k.decode(): v.decode() for k, v in connection.hgetall(keys.job(job_id)).items()}
    assert json.loads(record[job_record.SPEC]) == request.model_dump(mode="json")
    assert (record[job_record.STATE], record[job_record.RQ_QUEUE], record[job_record.POSITION], record[job_record.KIND]) == ("queued", queue, "1", "inference")
    assert connection.ttl(keys.job(job_id)) > 0 and connection.ttl(keys.job_events(job_id)) > 0
    [(entry_id, fields)] = connection.xrange(keys.job_events(job_id))
    assert entry_id == b"1-0" and json.loads(fields[b"d"]) == {"event": "queued", "position": 1}


def test_depth_limits_refuse_and_write_nothing(redis_url, queue):
    connection = redis.Redis.from_url(redis_url)
    settings = Settings(queue=queue, max_queue=3, max_queue_per_model=2)
    request = InferenceRequest(model="acme/tiny", prompt="x")
    positions = [submit(redis_url, settings, request)[1] for _ in range(2)]
    assert positions == [1, 2]
    with pytest.raises(QueueFull, match="2 jobs for acme/tiny are waiting"):
        submit(redis_url, settings, request)
    submit(redis_url, settings, InferenceRequest(model="acme/other", prompt="x"))
    with pytest.raises(QueueFull, match="3 jobs are waiting"):
        submit(redis_url, settings, InferenceRequest(model="acme/third", prompt="x"))
    assert connection.llen(f"rq:queue:{queue}") == 3
    assert connection.zcard(keys.jobs_index(queue)) == 3


def test_a_live_holder_with_a_free_slot_is_picked_and_pulls_never_are(redis_url, queue):
    """A one-slot worker takes one job by warm routing; the next goes to the shared queue."""
    connection = redis.Redis.from_url(redis_url)
    settings = Settings(queue=queue)
    now = time.time()
    connection.zadd(keys.workers(queue), {"w-live": now, "w-dead": now - 60})
    connection.hset(keys.worker("w-live"), mapping={"capacity": 1, "running": 0})
    connection.zadd(keys.idle_with(queue, "acme/tiny", None), {"w-dead": now, "w-live": now - 1})
    pull_id, _ = submit(redis_url, settings, PullRequest(model="acme/tiny"))
    first, position = submit(redis_url, settings, InferenceRequest(model="acme/tiny", prompt="x"))
    second, _ = submit(redis_url, settings, InferenceRequest(model="acme/tiny", prompt="x"))
    own_queue = keys.worker_queue(queue, "w-live")
    assert position == 1
    assert connection.lrange(f"rq:queue:{own_queue}", 0, -1) == [first.encode()]
    assert connection.lrange(f"rq:queue:{queue}", 0, -1) == [pull_id.encode(), second.encode()]
    assert connection.hget(keys.job(first), job_record.RQ_QUEUE) == own_queue.encode()
    assert connection.hget(Job.key_for(first), "origin") == own_queue.encode()
    assert connection.zcard(keys.idle_with(queue, "acme/tiny", None)) == 0  # the dead one dropped, the full one too


def test_warm_routing_fills_free_slots_most_free_first(redis_url, queue):
    """Capacity-aware: jobs go to the holder with the most free slots (capacity less
    running less already routed), and to the shared queue once every slot is taken."""
    connection = redis.Redis.from_url(redis_url)
    settings = Settings(queue=queue)
    now = time.time()
    connection.zadd(keys.workers(queue), {"a": now, "b": now})
    connection.hset(keys.worker("a"), mapping={"capacity": 4, "running": 3})
    connection.hset(keys.worker("b"), mapping={"capacity": 4, "running": 1})
    connection.zadd(keys.idle_with(queue, "acme/tiny", None), {"a": now, "b": now - 1})
    routed = [submit(redis_url, settings, InferenceRequest(model="acme/tiny", prompt="x"))[0] for _ in range(5)]
    on = {name: [i.decode() for i in connection.lrange(f"rq:queue:{keys.worker_queue(queue, name)}", 0, -1)] for name in "ab"}
    # b: 3 free, then 2 (a has 1); then a tie, to the most recently freed (a); then b's last.
    assert on == {"a": [routed[2]], "b": [routed[0], routed[1], routed[3]]}
    assert connection.lrange(f"rq:queue:{queue}", 0, -1) == [routed[4].encode()]  # every slot taken


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.add(int(stat.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.timeout(120)
def test_serve_with_two_processes_takes_and_streams_every_job_then_stops_cleanly(cluster, log_dir):
    """`hive serve --processes 2` beside the cluster's own hive, on its queue: jobs
    submitted to either process run on the cluster's worker and stream to the end."""
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    hive = processes.start(
        "hive-two-processes",
        processes.hive_command("serve", "--redis-url", cluster.redis_url, "--port", str(port), "--queue", cluster.queue, "--processes", "2", "--no-hub"),
        log_dir,
    )
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, 60, "hive --processes 2", (hive,))
        processes.wait_until(lambda: hive.log().count("Application startup complete") == 2, 60, "both processes", (hive,))
        assert len(children(hive.process.pid) - {hive.process.pid}) >= 2
        jobs_ = [sse.submit(url, model="acme/tiny", prompt="Hello", max_tokens=4, temperature=0) for _ in range(6)]
        for job in jobs_:
            received = sse.follow(url, job["sse_url"])
            assert received[-1].done and received[-2].event == "end", received
            assert sse.status(url, job["job_id"])["state"] == "completed"
    finally:
        hive.stop()
    assert hive.process.returncode == 0, hive.log()[-3000:]
    assert "Traceback" not in hive.log()


@pytest.mark.parametrize("count", ["1", "2"])
def test_serve_on_a_port_in_use_exits_non_zero_with_a_clear_message(redis_url, count):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = processes.run_hive("serve", "--redis-url", redis_url, "--port", port, "--processes", count, "--no-hub", timeout=60)
    assert done.returncode != 0
    output = " ".join((done.stderr + done.stdout).replace("│", " ").split()).lower()  # unwrapped from rich's box
    assert "traceback" not in output
    assert "address already in use" in output
