"""A worker never wedges: its Redis connections are a budget, not one more per model held.

Found under load (issue 19): each loaded model kept one connection checked out of the
worker's pool, so with the default keep-alive the 47th model used the pool up, and
from then on every heartbeat and lease renewal failed while the process stayed up.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import redis

from tests import processes, sse
from tests.tiny_models import build_model

pytestmark = pytest.mark.e2e

MODELS = 100


@pytest.fixture(scope="module")
def many_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("many-models")
    tiny = build_model(root / "acme" / "m000")
    for k in range(1, MODELS):
        shutil.copytree(tiny, root / "acme" / f"m{k:03d}")
    return root


@pytest.mark.timeout(600)
def test_a_worker_holding_a_hundred_models_keeps_serving(many_models, log_dir, tmp_path):
    """Default keep-alive and batch size: every model stays loaded (the budget is the
    machine's memory), and the worker still serves, heartbeats and renews leases."""
    redis_proc, redis_url = processes.start_redis(log_dir)
    hub_proc, hub_url = processes.start_hub(many_models, log_dir, name="hub-many")
    port = processes.free_port()
    queue = "hive:test-many-models"
    hive = processes.start(
        "hive-many", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir
    )
    worker = processes.start(
        "worker-many",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu"),
        log_dir,
        env={"HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(redis_url)
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "hive and worker", (hive, worker))
        for k in range(MODELS):
            job, _ = sse.run_job(url, model=f"acme/m{k:03d}", prompt="Hello", max_tokens=2, temperature=0)
            status = sse.status(url, job["job_id"])
            assert status["state"] == "completed", (k, status)
        (listed,) = httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"]
        assert len(listed["models"]) == MODELS  # all held: the default keep-alive is 5 minutes

        job, received = sse.run_job(url, model="acme/m000", prompt="Hello again", max_tokens=2, temperature=0)
        assert sse.status(url, job["job_id"])["state"] == "completed"
        (ready,) = [r.json() for r in received if r.event == "ready"]
        assert ready["warm"]  # the first model was still held

        # Every connection the worker holds is one it counted: its slots' and listeners',
        # not one per model (the hive's own are a handful).
        assert client.info("clients")["connected_clients"] < MODELS
        log = worker.log()
        assert "heartbeat failed" not in log and "No connection available" not in log and "lease" not in log.lower()
    finally:
        client.close()
        for proc in (worker, hive, hub_proc, redis_proc):
            proc.stop()
