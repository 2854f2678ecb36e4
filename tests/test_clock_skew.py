"""A worker whose host clock disagrees with the hive's by 10 s, ahead or behind:
it is listed, takes jobs, and its death still ends its job within seconds. The
worker's clock is skewed by a ``sitecustomize`` on its PYTHONPATH that shifts
``time.time`` and ``time.time_ns`` (the system clock itself cannot be changed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests import processes
from tests.sse import events, follow, status, submit

pytestmark = pytest.mark.e2e

SKEW_S = 10.0

_SITECUSTOMIZE = """\
import time

_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + {skew!r}
time.time_ns = lambda: _time_ns() + {skew_ns!r}
"""


def skewed_env(folder: Path, skew_s: float) -> dict:
    """The environment of a process whose wall clock is off by ``skew_s``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(skew=skew_s, skew_ns=int(skew_s * 1e9)))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S], ids=["behind", "ahead"])
def test_a_worker_with_a_skewed_clock_is_listed_runs_jobs_and_is_noticed_dead(skew_s, redis_url, hub, log_dir, tmp_path):
    env = skewed_env(tmp_path / "skew", skew_s)
    # The shim works: the worker's Python sees a clock off by skew_s.
    seen = float(subprocess.run([sys.executable, "-c", "import time; print(time.time())"], env={**os.environ, **env},
                                capture_output=True, text=True, check=True, timeout=30).stdout)
    assert abs(seen - time.time() - skew_s) < 2

    name = "behind" if skew_s < 0 else "ahead"
    port = processes.free_port()
    queue = f"hive:test-skew-{name}"
    hive = processes.start(f"hive-skew-{name}", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir)
    worker = processes.start(
        f"worker-skew-{name}",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--token-delay-ms", "100"),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) == 1, processes.STARTUP_TIMEOUT_S, "skewed worker", (hive, worker))
        listed = httpx.get(f"{url}/v1/workers", timeout=5).json()["workers"]
        assert len(listed) == 1 and listed[0]["id"].endswith(f":{worker.process.pid}")
        # Its heartbeat is on the cluster's clock, not its own.
        assert abs(listed[0]["last_heartbeat"] - time.time()) < 3

        done = submit(url, model="acme/tiny", prompt="Hello", max_tokens=5, temperature=0)
        got = events(follow(url, done["sse_url"], timeout=60))
        assert got[-1].event == "end", [(e.event, e.data) for e in got[-3:]]
        assert status(url, done["job_id"])["state"] == "completed"

        # Killed after its third token: the lease runs out on the hive's side within seconds.
        job = submit(url, model="acme/tiny", prompt="Hello", max_tokens=200, temperature=0)
        tokens, killed_at, ended_at = 0, 0.0, 0.0
        with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{url}{job['sse_url']}") as source:
            for sse in source.iter_sse():
                if sse.event == "token":
                    tokens += 1
                    if tokens == 3:
                        os.kill(worker.process.pid, signal.SIGKILL)
                        killed_at = time.monotonic()
                elif sse.event == "error":
                    ended_at = time.monotonic()
                    assert '"code":"WORKER_LOST"' in sse.data
                if sse.data == "[DONE]":
                    break
        assert killed_at and ended_at and ended_at - killed_at < 10
        assert status(url, job["job_id"])["error"]["code"] == "WORKER_LOST"
    finally:
        worker.stop()
        hive.stop()
