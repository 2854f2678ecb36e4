"""Processes start in any order: a hive and a worker started before Redis wait for
it, saying so in their logs, and serve as soon as it answers; a Redis URL that can
never work stops them with one line, not a traceback."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from tests import processes
from tests.sse import events, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_a_hive_and_a_worker_started_before_redis_wait_for_it_then_serve(log_dir, hub, tmp_path):
    port = processes.free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    hive_port = processes.free_port()
    url = f"http://127.0.0.1:{hive_port}"
    hive = processes.start("hive-early", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(hive_port)), log_dir)
    worker = processes.start(
        "worker-early",
        processes.hive_command("worker", "--redis-url", redis_url, "--device", "cpu", "--max-batch", "2"),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")},
    )
    redis_proc = None
    try:
        # Up without Redis: the hive answers, and its health says what is missing.
        processes.wait_until(lambda: _health_status(url) == 503, processes.STARTUP_TIMEOUT_S, "the hive answering 503", (hive,))
        for proc in (hive, worker):
            processes.wait_until(lambda p=proc: f"waiting for Redis at {redis_url}" in p.log(), 30, f"{proc.name} waiting", (proc,))
        redis_proc = processes.start_redis_on(port, log_dir)
        processes.wait_until(lambda: processes.health(url).get("workers") == 1, processes.STARTUP_TIMEOUT_S, "the cluster", (hive, worker))
        _, received = run_job(url, model="acme/tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert [r.event for r in events(received)][-1] == "end"
        for proc in (hive, worker):
            assert "Traceback" not in proc.log(), proc.log()[-3000:]
    finally:
        worker.stop()
        hive.stop()
        if redis_proc is not None:
            redis_proc.stop()


def _health_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.TransportError:
        return None


@pytest.fixture(scope="module")
def password_redis(log_dir):
    port = processes.free_port()
    proc = processes.start(
        "redis-password", [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "sekret"], log_dir
    )
    processes.wait_until(lambda: "Ready to accept connections" in proc.log(), 10, "redis-server", (proc,))
    yield port
    proc.stop()


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize(
    "case", ["unknown scheme", "wrong password", "no password"],
)
def test_a_redis_url_that_can_never_work_is_one_line_and_a_nonzero_exit(command, case, password_redis):
    url = {
        "unknown scheme": "http://127.0.0.1:6379",
        "wrong password": f"redis://:wrong@127.0.0.1:{password_redis}/0",
        "no password": f"redis://127.0.0.1:{password_redis}/0",
    }[case]
    result = subprocess.run(processes.hive_command(command, "--redis-url", url), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert "wrong" not in lines[0]  # the password is not printed
