"""Redis stops and comes back under a running hive and a worker in the middle of
a job: clear errors, no hang, nothing stuck, and both reconnect by themselves."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis

from hive.streams.relay import OUTAGE_GRACE_S
from shared.clock import RedisClock
from shared.events import End
from tests import processes
from tests.redis_proxy import RedisProxy
from tests.sse import follow, lost_events, submit
from worker.cluster.reporter import JobReporter

pytestmark = pytest.mark.e2e


def test_hive_survives_a_redis_restart(log_dir):
    port = processes.free_port()
    redis_proc = processes.start_redis_on(port, log_dir)
    hive_port = processes.free_port()
    url = f"http://127.0.0.1:{hive_port}"
    hive = processes.start(
        "hive-outage",
        processes.hive_command("serve", "--redis-url", f"redis://127.0.0.1:{port}/0", "--port", str(hive_port), "--queue", "hive:test-outage"),
        log_dir,
    )
    try:
        processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "hive", (hive,))
        job = submit(url, model="acme/tiny", prompt="x")
        result: dict = {}
        reader = threading.Thread(target=lambda: result.update(events=follow(url, job["sse_url"], timeout=30)))
        reader.start()
        processes.wait_until(lambda: processes.health(url)["followers"] == 1, 10, "follower")

        redis_proc.stop()
        stopped_at = time.monotonic()
        reader.join(20)
        received = result["events"]
        assert received[-2].event == "error" and received[-2].json()["code"] == "REDIS_UNAVAILABLE"
        # The stream waited OUTAGE_GRACE_S for Redis (a failover's length), then ended.
        assert received[-1].done and OUTAGE_GRACE_S <= time.monotonic() - stopped_at < OUTAGE_GRACE_S + 5
        response = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "REDIS_UNAVAILABLE"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "error" in health.json()["redis"]

        redis_proc = processes.start_redis_on(port, log_dir)
        processes.wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "hive reconnected", (hive,))
        job = submit(url, model="acme/tiny", prompt="x")
        # Live events flow again: the relay resubscribed.
        result.clear()
        reader = threading.Thread(target=lambda: result.update(events=follow(url, job["sse_url"], timeout=30)))
        reader.start()
        processes.wait_until(lambda: processes.health(url)["followers"] == 1, 10, "follower")
        connection = redis.Redis(port=port)
        JobReporter(connection, RedisClock(connection), job["job_id"], 60).emit(End(0, 0.0, 0.0, "eos"))
        sent_at = time.monotonic()
        reader.join(20)
        assert [r.event for r in result["events"]][-2:] == ["end", "message"] and result["events"][-1].done
        assert result["events"][-2].at - sent_at < 2.0  # live, not the 5 s catch-up
        connection.close()
    finally:
        hive.stop()
        redis_proc.stop()


def test_a_worker_outlives_a_redis_restart_in_the_middle_of_a_job(log_dir, hub, tmp_path):
    port = processes.free_port()
    redis_proc = processes.start_redis_on(port, log_dir, tmp_path)
    redis_url = f"redis://127.0.0.1:{port}/0"
    hive_port = processes.free_port()
    url = f"http://127.0.0.1:{hive_port}"
    hive = processes.start(
        "hive-worker-outage", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(hive_port)), log_dir
    )
    worker = processes.start(
        "worker-outage",
        processes.hive_command("worker", "--redis-url", redis_url, "--device", "cpu", "--token-delay-ms", "100"),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")},
    )
    client = redis.Redis(port=port, decode_responses=True)
    try:
        processes.wait_until(lambda: processes.health(url).get("workers") == 1, processes.STARTUP_TIMEOUT_S, "cluster", (hive, worker))
        job = submit(url, model="acme/tiny", prompt="The quick brown fox", max_tokens=200, temperature=0)
        log_key = f"hive:job:{job['job_id']}:events"
        # Tokens, not only the download's and load's events: an outage before the job
        # joins a batch ends it with REDIS_UNAVAILABLE, which is not what this tests.
        processes.wait_until(lambda: sum(e["e"] == "token" for _, e in client.xrange(log_key)) >= 3, 30, "a few tokens", (worker,))

        redis_proc.stop()
        down_at = time.monotonic()
        processes.wait_until(lambda: "lost Redis" in worker.log(), 10, "the worker noticing")
        redis_proc = processes.start_redis_on(port, log_dir, tmp_path)
        outage_s = time.monotonic() - down_at

        # The batch waited for Redis and went on: the job completes, and its stream
        # is one ordered log whose ids only grow; the events of the step in flight
        # when Redis went may be gone, and then a `gap` event says which.
        processes.wait_until(lambda: client.hget(f"hive:job:{job['job_id']}", "state") == "completed", 30, "the job ending", (worker,))
        assert "the batch waits for Redis" in worker.log()
        received = follow(url, job["sse_url"], timeout=20)
        assert received[-2].event == "end" and received[-2].json()["tokens_out"] == 200 and received[-1].done
        lost = lost_events(received)
        tokens = [r.json()["i"] for r in received if r.event == "token"]
        assert tokens == sorted(set(tokens)) and len(tokens) + lost >= 200
        # The record has the whole text, lost events or not.
        assert len(httpx.get(f"{url}/v1/inference/{job['job_id']}").json()["output"]) >= len("".join(r.json()["t"] for r in received if r.event == "token"))
        assert outage_s < 10

        # The worker itself lived through it and takes the next job.
        worker.check_alive()
        job = submit(url, model="acme/tiny", prompt="The quick brown fox", max_tokens=5, temperature=0)
        received = follow(url, job["sse_url"], timeout=30)
        assert received[-2].event == "end" and received[-2].json()["tokens_out"] == 5
    finally:
        client.close()
        worker.stop()
        hive.stop()
        redis_proc.stop()


@pytest.mark.timeout(150)
def test_a_worker_waits_out_redis_lost_in_rqs_own_bookkeeping_after_a_job(log_dir, hub, tmp_path):
    """Redis gone while RQ records a job's success (``handle_job_success``, after the
    job's own end went out) used to make RQ quit ("found an unhandled exception,
    quitting...") and the worker process exit.

    The window is hit on purpose, not by timing: the worker reaches Redis through
    tests/redis_proxy.py, which reads every command it sends. The first command of
    RQ's success bookkeeping is ``WATCH rq:job:<id>:dependents`` (RQ's transaction
    that finishes the job); no other worker code sends a WATCH. When it arrives, the
    proxy stops Redis before forwarding it and drops the connection: the worker meets
    a dead Redis exactly there. Redis then comes back on the same port with its
    append-only file, as after a restart."""
    port = processes.free_port()
    redis_procs = [processes.start_redis_on(port, log_dir, tmp_path)]
    proxy = RedisProxy(
        port,
        at=lambda args: args[0].upper() == b"WATCH" and args[1].startswith(b"rq:job:") and args[1].endswith(b":dependents"),
        then=lambda: redis_procs[-1].stop(),
    )
    hive_port = processes.free_port()
    url = f"http://127.0.0.1:{hive_port}"
    hive = processes.start(
        "hive-rq-bookkeeping",
        processes.hive_command("serve", "--redis-url", f"redis://127.0.0.1:{port}/0", "--port", str(hive_port), "--queue", "hive:test-rq-bookkeeping"),
        log_dir,
    )
    # One slot: the one on the main thread, whose RQ loop quitting ended the process.
    worker = processes.start(
        "worker-rq-bookkeeping",
        processes.hive_command(
            "worker", "--redis-url", f"redis://127.0.0.1:{proxy.port}/0", "--queue", "hive:test-rq-bookkeeping", "--device", "cpu", "--max-batch", "1"
        ),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")},
    )
    client = redis.Redis(port=port, decode_responses=True)
    try:
        processes.wait_until(lambda: processes.health(url).get("workers") == 1, processes.STARTUP_TIMEOUT_S, "cluster", (hive, worker))
        job = submit(url, model="acme/tiny", prompt="The quick brown fox", max_tokens=5, temperature=0)
        assert proxy.fired.wait(60), "RQ's success bookkeeping never started"
        assert proxy.caught[1] == f"rq:job:{job['job_id']}:dependents".encode()
        processes.wait_until(lambda: f"success bookkeeping of job {job['job_id']} lost Redis" in worker.log(), 20, "the worker waiting", (worker,))

        redis_procs.append(processes.start_redis_on(port, log_dir, tmp_path))
        processes.wait_until(lambda: "answers" in worker.log(), 20, "the worker seeing Redis back", (worker,))

        # The job ran once and ended once: its own end had gone out before RQ's
        # bookkeeping, which is now complete (RQ deletes a finished job's hash, as
        # result_ttl is 0, and takes it off its registries); it is queued nowhere.
        processes.wait_until(lambda: not client.exists(f"rq:job:{job['job_id']}"), 10, "RQ's bookkeeping", (worker,))
        assert client.hget(f"hive:job:{job['job_id']}", "state") == "completed"
        events = [fields["e"] for _, fields in client.xrange(f"hive:job:{job['job_id']}:events")]
        assert events.count("end") == 1 and events.count("started") == 1
        # RQ's started ("wip", members "<job>:<execution>") and failed registries, and its
        # queues (the shared one and the worker's own), wherever the job was routed.
        for pattern, members in (("rq:wip:*", client.zrange), ("rq:failed:*", client.zrange), ("rq:queue:*", client.lrange)):
            for key in client.scan_iter(pattern):
                assert not [m for m in members(key, 0, -1) if m.startswith(job["job_id"])], key

        # The worker lived through it and takes the next job.
        processes.wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "hive reconnected", (hive,))
        job = submit(url, model="acme/tiny", prompt="The quick brown fox", max_tokens=5, temperature=0)
        received = follow(url, job["sse_url"], timeout=30)
        assert received[-2].event == "end" and received[-2].json()["tokens_out"] == 5
        worker.check_alive()
        assert "unhandled exception" not in worker.log() and "Traceback" not in worker.log()
    finally:
        client.close()
        worker.stop()
        hive.stop()
        proxy.close()
        redis_procs[-1].stop()
