"""Backpressure: bounded queues answer 429; a job that waits too long ends with TIMEOUT."""

from __future__ import annotations

import httpx
import pytest

from tests import processes
from tests.sse import events, follow, status, submit

pytestmark = pytest.mark.e2e


@pytest.fixture()
def limited_hive(redis_url, log_dir, request):
    """A hive on a fresh queue no worker serves, started with the test's flags."""
    port = processes.free_port()
    queue = f"hive:test-{request.node.name[:40]}"
    proc = processes.start(
        f"hive-{request.node.name[:40]}",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue, *request.param),
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "hive", (proc,))
    yield url, queue
    proc.stop()


@pytest.mark.parametrize("limited_hive", [("--max-queue", "3", "--max-queue-per-model", "2")], indirect=True)
def test_full_queues_answer_429_and_enqueue_nothing(limited_hive, redis_client):
    url, queue = limited_hive
    for _ in range(2):
        submit(url, model="acme/a", prompt="x")
    response = httpx.post(f"{url}/v1/inference", json={"model": "acme/a", "prompt": "x"})
    assert response.status_code == 429 and response.json()["error"]["code"] == "QUEUE_FULL"
    assert int(response.headers["retry-after"]) > 0 and "acme/a" in response.json()["error"]["message"]
    submit(url, model="acme/b", prompt="x")  # another model still has room
    response = httpx.post(f"{url}/v1/inference", json={"model": "acme/c", "prompt": "x"})
    assert response.status_code == 429  # the global bound
    assert redis_client.llen(f"rq:queue:{queue}") == 3


@pytest.mark.parametrize("limited_hive", [("--max-queue-wait-s", "1")], indirect=True)
def test_a_job_waiting_past_the_limit_ends_with_timeout(limited_hive, redis_client):
    url, queue = limited_hive
    job = submit(url, model="acme/a", prompt="x")
    received = follow(url, job["sse_url"], timeout=15)
    assert [r.event for r in events(received)] == ["queued", "error"]
    assert events(received)[-1].json()["code"] == "TIMEOUT" and received[-1].done
    assert status(url, job["job_id"])["state"] == "failed"
    assert redis_client.llen(f"rq:queue:{queue}") == 0


def test_a_job_running_past_the_limit_ends_with_timeout(slow_cluster, redis_url, log_dir):
    # A second hive on the slow workers' queue, enqueueing with a 1 s run-time limit.
    port = processes.free_port()
    proc = processes.start(
        "hive-short-jobs",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", slow_cluster.queue, "--job-timeout-s", "1"),
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "hive", (proc,))
        job = submit(url, model="acme/tiny", prompt="x", max_tokens=100, temperature=0)  # 100 ms a token: 10 s
        received = follow(url, job["sse_url"], timeout=20)
        error = events(received)[-1]
        assert error.event == "error" and error.json()["code"] == "TIMEOUT"
        assert sum(1 for r in received if r.event == "token") < 30
        assert status(url, job["job_id"])["state"] == "failed"
    finally:
        proc.stop()
