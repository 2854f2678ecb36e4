"""Redis stops and comes back under a running hive: clear errors, no hang, and
the hive reconnects by itself."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
import redis

from shared.events import End
from tests import processes
from tests.sse import follow, submit
from worker.reporter import JobReporter

pytestmark = pytest.mark.e2e


def start_redis_on(port: int, log_dir) -> processes.Proc:
    exe = shutil.which("redis-server")
    proc = processes.start(f"redis-{port}", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], log_dir)
    client = redis.Redis(port=port)
    processes.wait_until(client.ping, 10, "redis-server", (proc,))
    client.close()
    return proc


def test_hive_survives_a_redis_restart(log_dir):
    port = processes.free_port()
    redis_proc = start_redis_on(port, log_dir)
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
        assert received[-1].done and time.monotonic() - stopped_at < 10
        response = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "REDIS_UNAVAILABLE"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "error" in health.json()["redis"]

        redis_proc = start_redis_on(port, log_dir)
        processes.wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "hive reconnected", (hive,))
        job = submit(url, model="acme/tiny", prompt="x")
        # Live events flow again: the relay resubscribed.
        result.clear()
        reader = threading.Thread(target=lambda: result.update(events=follow(url, job["sse_url"], timeout=30)))
        reader.start()
        processes.wait_until(lambda: processes.health(url)["followers"] == 1, 10, "follower")
        connection = redis.Redis(port=port)
        JobReporter(connection, job["job_id"], 60).emit(End(0, 0.0, 0.0, "eos"))
        sent_at = time.monotonic()
        reader.join(20)
        assert [r.event for r in result["events"]][-2:] == ["end", "message"] and result["events"][-1].done
        assert result["events"][-2].at - sent_at < 2.0  # live, not the 5 s catch-up
        connection.close()
    finally:
        hive.stop()
        redis_proc.stop()
