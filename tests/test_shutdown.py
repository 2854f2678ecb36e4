"""SIGTERM on the hive with streams open: each ends cleanly with a farewell (an
``error`` SHUTTING_DOWN without an id, then ``[DONE]``), the job goes on, and a
client resumes it from the restarted hive with Last-Event-ID."""

from __future__ import annotations

import subprocess
import threading

import httpx
import pytest
import redis

from shared import keys
from tests import processes
from tests.sse import status

pytestmark = pytest.mark.e2e


def start_hive(redis_url: str, port: int, queue: str, log_dir, name: str) -> processes.Proc:
    hive = processes.start(name, processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir)
    processes.wait_until(lambda: processes.health(f"http://127.0.0.1:{port}")["status"] == "ok", 30, name, (hive,))
    return hive


def read_raw(url: str, into: list[str]) -> None:
    """The stream's bytes as sent, to see which lines carry an id."""
    with httpx.stream("GET", url, timeout=30) as response:
        for text in response.iter_text():
            into.append(text)


def test_sigterm_ends_open_streams_cleanly_and_clients_resume(redis_url, hub, log_dir, tmp_path):
    port, queue = processes.free_port(), "hive:test-shutdown"
    url = f"http://127.0.0.1:{port}"
    hive = start_hive(redis_url, port, queue, log_dir, "hive-shutdown-1")
    worker = processes.start(
        "worker-shutdown",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--token-delay-ms", "100"),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")},
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    runner = None
    try:
        processes.wait_until(lambda: processes.health(url).get("workers") == 1, processes.STARTUP_TIMEOUT_S, "worker", (hive, worker))
        # `hive run` follows one job (and must resume it); a raw reader follows another.
        runner = subprocess.Popen(
            processes.hive_command("run", "--url", url, "--model", "acme/tiny", "--max-tokens", "40", "--temperature", "0", "The quick brown fox"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.wait_until(lambda: processes.health(url)["followers"] == 1, 30, "hive run following")
        processes.wait_until(lambda: client.zcard(keys.RUNNING) == 1, 30, "the job running")
        job_id = client.zrange(keys.RUNNING, 0, -1)[0]
        raw: list[str] = []
        reader = threading.Thread(target=read_raw, args=(f"{url}/v1/inference/{job_id}/stream", raw))
        reader.start()
        processes.wait_until(lambda: client.xlen(keys.job_events(job_id)) >= 10, 30, "some tokens", (worker,))

        hive.stop()
        reader.join(10)
        assert not reader.is_alive()
        assert hive.process.returncode is not None
        text = "".join(raw)
        farewell, done = text.rstrip("\n").split("\n\n")[-2:]
        assert farewell.startswith("event: error\n") and "SHUTTING_DOWN" in farewell and "id:" not in farewell
        assert done == "data: [DONE]"

        # The job went on without the hive; `hive run` resumes it from the new one.
        hive = start_hive(redis_url, port, queue, log_dir, "hive-shutdown-2")
        out, err = runner.communicate(timeout=60)
        assert runner.returncode == 0, err
        assert "SHUTTING_DOWN" in err and "resuming after event" in err
        final = status(url, job_id)
        assert final["state"] == "completed" and final["tokens_out"] == 40
        assert out.rstrip("\n") == final["output"]
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
        client.close()
        worker.stop()
        hive.stop()
