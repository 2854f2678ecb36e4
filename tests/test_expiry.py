"""Everything Hive writes to Redis expires: after the TTLs no key of a job is left."""

from __future__ import annotations

import httpx
import pytest

from tests import processes
from tests.sse import follow, submit

pytestmark = pytest.mark.e2e

TTL_S = 3


def test_nothing_of_a_job_is_left_after_its_ttl(redis_url, hub, log_dir, tmp_path, redis_client):
    port = processes.free_port()
    queue = "hive:test-ttl"
    env = {"HIVE_JOB_TTL_S": str(TTL_S), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    hive = processes.start("hive-ttl", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir, env)
    worker = processes.start(
        "worker-ttl",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--token-delay-ms", "50", "--max-batch", "1"),  # the second job waits
        log_dir,
        env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "worker", (hive, worker))
        completed = submit(url, model="acme/tiny", prompt="x", max_tokens=30, temperature=0)  # ~1.5 s
        cancelled = submit(url, model="acme/tiny", prompt="x", max_tokens=5)  # waits behind it
        assert httpx.delete(f"{url}{cancelled['status_url']}").status_code == 200
        failed = submit(url, model="acme/absent", prompt="x")
        # Each followed as soon as it can end: a record can expire TTL_S after its end.
        for job in (cancelled, completed, failed):
            assert follow(url, job["sse_url"])[-1].done
        job_ids = [job["job_id"] for job in (completed, cancelled, failed)]

        def leftovers() -> list[str]:
            found = [key for job_id in job_ids for key in redis_client.scan_iter(f"*{job_id}*")]
            for key in ("hive:running", f"hive:queued:{queue}", f"hive:queued:{queue}:acme/tiny", f"hive:queued:{queue}:acme/absent"):
                found += [f"{key} has {m}" for m in job_ids if redis_client.zscore(key, m) is not None]
            return found

        assert leftovers()  # the records are there while the TTL runs
        processes.wait_until(lambda: not leftovers(), TTL_S + 10, "every key of the jobs to expire")
    finally:
        worker.stop()
        hive.stop()
