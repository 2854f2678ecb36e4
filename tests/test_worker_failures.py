"""Workers killed with SIGKILL mid-job: followers hear about it, nothing hangs,
and a job that had produced no token yet runs again on another worker."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from httpx_sse import connect_sse

from tests import processes
from tests.sse import status, submit

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def fleet(redis_url, hub, log_dir, tmp_path_factory):
    """A hive and three slow workers (100 ms a token) on a queue of their own."""
    hf_home = tmp_path_factory.mktemp("hf-fleet")
    port = processes.free_port()
    queue = "hive:test-fleet"
    hive = processes.start(
        "hive-fleet", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir
    )
    workers = [
        processes.start(
            f"worker-fleet-{n}",
            processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--token-delay-ms", "100"),
            log_dir,
            env={"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home)},
        )
        for n in range(3)
    ]
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 3, processes.STARTUP_TIMEOUT_S, "fleet", (hive, *workers))
    yield url
    for proc in (*workers, hive):
        proc.stop()


def worker_pid(worker_name: str) -> int:
    return int(worker_name.rsplit(":", 1)[1])


def stream_with_kill(url: str, job: dict, kill_when) -> tuple[list[tuple[str, str, float]], float]:
    """Follows the job; kills its worker with SIGKILL the first time ``kill_when(event, data)`` holds."""
    received, killed_at = [], 0.0
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{url}{job['sse_url']}") as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            received.append((sse.event, sse.data, time.monotonic(), sse.id))
            if sse.data == "[DONE]":
                break
            if not killed_at and kill_when(sse.event, sse.data):
                os.kill(worker_pid(status(url, job["job_id"])["worker"]), signal.SIGKILL)
                killed_at = time.monotonic()
    return received, killed_at


def test_worker_killed_mid_generation_ends_the_stream_with_worker_lost(fleet):
    job = submit(fleet, model="acme/tiny", prompt=PROMPT, max_tokens=200, temperature=0)
    tokens = []
    received, killed_at = stream_with_kill(
        fleet, job, lambda event, data: event == "token" and tokens.append(data) is None and len(tokens) == 3
    )
    error = received[-2]
    assert error[0] == "error" and '"code":"WORKER_LOST"' in error[1]
    assert received[-1][1] == "[DONE]"
    assert error[2] - killed_at < 10
    final = status(fleet, job["job_id"])
    assert final["state"] == "failed" and final["error"]["code"] == "WORKER_LOST"


def test_worker_killed_before_the_first_token_retries_once_on_another(fleet):
    # acme/big-retry: 16 MB at 8 MB/s, so the kill lands mid-download.
    job = submit(fleet, model="acme/big-retry", prompt=PROMPT, max_tokens=3, temperature=0)
    first_worker = []

    def during_download(event: str, data: str) -> bool:
        if event == "download" and '"bytes_downloaded":0,' not in data:
            first_worker.append(status(fleet, job["job_id"])["worker"])
            return True
        return False

    received, killed_at = stream_with_kill(fleet, job, during_download)
    kinds = [r[0] for r in received]
    assert "retry" in kinds and kinds[-2] == "end" and kinds.count("token") == 3
    retry = received[kinds.index("retry")]
    assert '"attempt":2' in retry[1] and retry[2] - killed_at < 10
    # After the retry the model is fetched and loaded again, by the new worker.
    assert "loading" in kinds[kinds.index("retry") :]
    # Still one ordered stream: ids 1, 2, 3, ... across both attempts.
    ids = [int(r[3]) for r in received if r[1] != "[DONE]"]
    assert ids == list(range(1, len(ids) + 1))
    final = status(fleet, job["job_id"])
    assert final["state"] == "completed" and final["attempt"] == 2
    assert final["worker"] != first_worker[0]


def test_sigterm_lets_the_worker_finish_its_job_then_exit(redis_url, hub, log_dir, tmp_path):
    url, _, hive, worker = processes.start_hive_and_worker("sigterm", redis_url, hub.url, log_dir, tmp_path / "hf", "--token-delay-ms", "100")
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "worker", (hive, worker))
        job = submit(url, model="acme/tiny", prompt=PROMPT, max_tokens=15, temperature=0)
        tokens = []
        with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{url}{job['sse_url']}") as source:
            for sse in source.iter_sse():
                if sse.event == "token":
                    tokens.append(sse.data)
                    if len(tokens) == 3:
                        worker.process.send_signal(signal.SIGTERM)
                if sse.data == "[DONE]":
                    break
        assert len(tokens) == 15 and status(url, job["job_id"])["state"] == "completed"
        assert worker.process.wait(15) == 0
    finally:
        worker.stop()
        hive.stop()
