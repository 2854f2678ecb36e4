"""The admin commands (`hive status`, `hive workers|jobs|models|queue ...`) run with
typer's CliRunner against real hives and workers, and `hive jobs tail` once in a
real terminal (a pseudo-terminal), where rich draws its progress bars."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import time

import httpx
import pytest
from typer.testing import CliRunner

from hive.cli import app
from tests import processes
from tests.sse import events, follow, status, submit

pytestmark = pytest.mark.e2e

KEY_A, KEY_B, ADMIN = "admin-cli-key-a-0123", "admin-cli-key-b-0123", "admin-cli-admin-0123"
PROMPT = "The quick brown fox"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
runner = CliRunner()


def hive(*args: str, env: dict | None = None, input: str | None = None):
    """Runs a `hive` command in-process; the caller's HIVE_URL and HIVE_API_KEY do not leak in."""
    return runner.invoke(app, list(args), env={"HIVE_URL": None, "HIVE_API_KEY": None, **(env or {})}, input=input, catch_exceptions=False)


def hive_json(*args: str, env: dict | None = None):
    result = hive(*args, "--json", env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cold_model(hub, name: str) -> str:
    """A copy of acme/tiny under a name no worker has seen: its job downloads and loads."""
    shutil.copytree(hub.root / "acme" / "tiny", hub.root / "acme" / name)
    return f"acme/{name}"


def test_status_shows_the_hive_redis_workers_and_queues(cluster):
    result = hive("status", "--url", cluster.url)
    assert result.exit_code == 0, result.output
    worker = httpx.get(f"{cluster.url}/v1/workers").json()["workers"][0]["id"]
    for text in (cluster.url, "redis", "ok", "1 live", cluster.queue, worker):
        assert text in result.stdout

    answer = hive_json("status", "--url", cluster.url)
    assert answer["health"]["status"] == "ok" and answer["health"]["redis"] == "ok"
    assert [w["id"] for w in answer["workers"]] == [worker]
    assert answer["queues"][0] == {"name": cluster.queue, "worker": None, "worker_alive": None, "length": 0}
    assert {"name": f"{cluster.queue}:w:{worker}", "worker": worker, "worker_alive": True, "length": 0} in answer["queues"]


def test_an_unreachable_hive_exits_3_with_a_readable_error():
    url = f"http://127.0.0.1:{processes.free_port()}"
    for command in (["status"], ["workers", "ls"], ["jobs", "ls", "--json"], ["queue", "purge", "--yes"]):
        result = hive(*command, "--url", url)
        assert result.exit_code == 3, (command, result.output)
        assert "cannot reach the hive" in result.stderr and result.stdout == ""


def test_workers_ls(cluster):
    expected = httpx.get(f"{cluster.url}/v1/workers").json()
    answer = hive_json("workers", "ls", "--url", cluster.url)
    assert [w["id"] for w in answer["workers"]] == [w["id"] for w in expected["workers"]]
    assert "current_job" in answer["workers"][0]  # local mode: everyone is admin
    result = hive("workers", "ls", "--url", cluster.url)
    assert result.exit_code == 0 and expected["workers"][0]["id"] in result.stdout and "cpu" in result.stdout


def test_jobs_ls_show_and_tail_a_completed_job(cluster):
    job = submit(cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    received = follow(cluster.url, job["sse_url"])
    job_id = job["job_id"]
    output = status(cluster.url, job_id)["output"]

    listed = hive_json("jobs", "ls", "--url", cluster.url, "--limit", "5")["jobs"]
    assert listed[0]["job_id"] == job_id and listed[0]["state"] == "completed" and listed[0]["tokens_out"] == 5
    assert "output" not in listed[0]
    assert job_id not in {j["job_id"] for j in hive_json("jobs", "ls", "--url", cluster.url, "--state", "failed")["jobs"]}
    assert len(hive_json("jobs", "ls", "--url", cluster.url, "--limit", "1")["jobs"]) == 1
    result = hive("jobs", "ls", "--url", cluster.url)
    assert result.exit_code == 0 and job_id in result.stdout and "completed" in result.stdout

    assert hive_json("jobs", "show", job_id, "--url", cluster.url) == status(cluster.url, job_id)
    result = hive("jobs", "show", job_id, "--url", cluster.url)
    assert result.exit_code == 0 and "completed" in result.stdout and "acme/tiny@main" in result.stdout
    assert result.stdout.endswith(output + "\n")

    result = hive("jobs", "tail", job_id, "--url", cluster.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == output + "\n"  # tokens on stdout, the rest on stderr
    assert "queued at position" in result.stderr and "5 tokens" in result.stderr

    # From an event id on: exactly what came after it.
    started = next(r for r in events(received) if r.event == "started")
    result = hive("jobs", "tail", job_id, "--from-id", started.id, "--url", cluster.url)
    assert result.exit_code == 0 and result.stdout == output + "\n"
    assert "queued" not in result.stderr and "generating" not in result.stderr and "5 tokens" in result.stderr


def test_tailing_a_failed_job_exits_1(cluster):
    job = submit(cluster.url, model="acme/missing", prompt=PROMPT)
    result = hive("jobs", "tail", job["job_id"], "--url", cluster.url)
    assert result.exit_code == 1 and "MODEL_NOT_FOUND" in result.stderr
    failed = hive_json("jobs", "ls", "--url", cluster.url, "--state", "failed")["jobs"]
    assert job["job_id"] in {j["job_id"] for j in failed}
    assert next(j for j in failed if j["job_id"] == job["job_id"])["error"]["code"] == "MODEL_NOT_FOUND"


def test_unknown_jobs_and_bad_options_exit_2(cluster):
    for command in ("show", "tail", "cancel"):
        result = hive("jobs", command, "0" * 32, "--url", cluster.url)
        assert result.exit_code == 2 and "no such job" in result.stderr, result.output
    result = hive("jobs", "ls", "--state", "sleeping", "--url", cluster.url)
    assert result.exit_code == 2 and "INVALID_REQUEST" in result.stderr
    assert hive("jobs", "ls", "--limit", "0", "--url", cluster.url).exit_code == 2


def test_cancel_a_queued_job(idle_hive):
    url, _ = idle_hive
    job = submit(url, model="acme/tiny", prompt=PROMPT)
    queued = hive_json("jobs", "ls", "--url", url, "--state", "queued")["jobs"]
    assert job["job_id"] in {j["job_id"] for j in queued}

    result = hive("jobs", "cancel", job["job_id"], "--url", url)
    assert result.exit_code == 0 and "cancelled" in result.stderr
    result = hive("jobs", "cancel", job["job_id"], "--url", url)
    assert result.exit_code == 2 and "already cancelled" in result.stderr
    result = hive("jobs", "tail", job["job_id"], "--url", url)
    assert result.exit_code == 1 and "CANCELLED" in result.stderr


def test_queue_ls_and_purge_cancel_every_waiting_job(idle_hive):
    url, queue = idle_hive
    jobs = [submit(url, model="acme/tiny", prompt=PROMPT) for _ in range(3)]
    shared = hive_json("queue", "ls", "--url", url)["queues"][0]
    assert shared["name"] == queue and shared["length"] >= 3
    result = hive("queue", "ls", "--url", url)
    assert result.exit_code == 0 and queue in result.stdout and "waiting in all" in result.stdout

    declined = hive("queue", "purge", queue, "--url", url, input="n\n")
    assert declined.exit_code == 1 and "nothing purged" in declined.stderr
    assert hive_json("queue", "ls", "--url", url)["queues"][0]["length"] == shared["length"]
    unknown = hive("queue", "purge", "hive:nowhere", "--yes", "--url", url)
    assert unknown.exit_code == 2 and "no queue hive:nowhere" in unknown.stderr

    answer = hive_json("queue", "purge", queue, "--yes", "--url", url)
    [purged] = answer["purged"]
    assert purged["queue"] == queue and {j["job_id"] for j in jobs} <= set(purged["cancelled"])
    for job in jobs:  # each stream ends like any cancel: error CANCELLED, then [DONE]
        received = follow(url, job["sse_url"], timeout=10)
        assert received[-1].done and received[-2].event == "error" and received[-2].json()["code"] == "CANCELLED"
    assert hive_json("queue", "ls", "--url", url)["queues"][0]["length"] == 0
    cancelled = {j["job_id"] for j in hive_json("jobs", "ls", "--url", url, "--state", "cancelled")["jobs"]}
    assert {j["job_id"] for j in jobs} <= cancelled

    result = hive("queue", "purge", "--yes", "--url", url)
    assert result.exit_code == 0 and "nothing waiting" in result.stderr


def test_models_pull_ls_and_rm(cluster, hub):
    model = cold_model(hub, "admin-cli-pulled")
    result = hive("models", "pull", model, "--url", cluster.url)
    assert result.exit_code == 0, result.output
    assert "download" in result.stderr and "pulled" in result.stderr and result.stdout == ""

    listed = {m["id"]: m for m in hive_json("models", "ls", "--url", cluster.url)["data"]}
    assert listed[model]["cached_on"] and not listed[model]["loaded_on"]
    result = hive("models", "ls", "--url", cluster.url)
    assert result.exit_code == 0 and model in result.stdout

    result = hive("models", "rm", model, "--url", cluster.url)
    assert result.exit_code == 0 and f"deleting {model}" in result.stderr

    def gone() -> bool:
        if model not in {m["id"] for m in hive_json("models", "ls", "--url", cluster.url)["data"]}:
            return True
        # The two clusters' workers share one hub cache and race for its lock on a
        # delete: the loser lists the model until asked again (worker/cluster/presence.py).
        hive("models", "rm", model, "--url", cluster.url)
        return False

    processes.wait_until(gone, 10, "the model deleted")
    result = hive("models", "rm", model, "--url", cluster.url)
    assert result.exit_code == 2 and f"no worker has {model}" in result.stderr

    assert hive("models", "pull", "acme/absent", "--url", cluster.url).exit_code == 1
    assert hive("models", "rm", "not-a-repo-id", "--url", cluster.url).exit_code == 2
    result = hive("models", "pull", "acme/bad..name", "--url", cluster.url)
    assert result.exit_code == 2 and "INVALID_REQUEST" in result.stderr


@pytest.fixture(scope="module")
def keyed_hive(redis_url, log_dir):
    """A hive with API keys and an admin key, on a queue no worker serves."""
    port = processes.free_port()
    proc = processes.start(
        "hive-admin-cli-keys",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", "hive:test-admin-cli-keys"),
        log_dir,
        env={"HIVE_API_KEYS": f"{KEY_A},{KEY_B}", "HIVE_ADMIN_KEYS": ADMIN},
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "keyed hive", (proc,))
    yield url
    proc.stop()


def test_keys_decide_what_jobs_a_command_sees_and_may_do(keyed_hive):
    url = keyed_hive

    def submit_as(key: str) -> str:
        answer = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": "hi"}, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 202, answer.text
        return answer.json()["job_id"]

    mine, theirs = submit_as(KEY_A), submit_as(KEY_B)
    env = {"HIVE_URL": url}
    listed = {j["job_id"] for j in hive_json("jobs", "ls", "--api-key", KEY_A, env=env)["jobs"]}
    assert mine in listed and theirs not in listed
    listed = {j["job_id"] for j in hive_json("jobs", "ls", env={**env, "HIVE_API_KEY": ADMIN})["jobs"]}
    assert {mine, theirs} <= listed

    result = hive("jobs", "ls", env=env)
    assert result.exit_code == 2 and "UNAUTHORIZED" in result.stderr
    result = hive("jobs", "show", theirs, "--api-key", KEY_A, env=env)
    assert result.exit_code == 2 and "no such job" in result.stderr
    for command in (["queue", "purge", "--yes"], ["models", "pull", "acme/tiny"], ["models", "rm", "acme/tiny"]):
        result = hive(*command, "--api-key", KEY_A, env=env)
        assert result.exit_code == 2 and "FORBIDDEN" in result.stderr, (command, result.output)
    assert hive("queue", "ls", "--api-key", KEY_A, env=env).exit_code == 0

    result = hive("queue", "purge", "--yes", "--json", "--api-key", ADMIN, env=env)
    assert result.exit_code == 0 and {mine, theirs} <= set(json.loads(result.stdout)["purged"][0]["cancelled"])


def run_in_terminal(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Runs ``command`` with a pseudo-terminal (120 columns) as its stdin, stdout and
    stderr; returns its exit code and everything it wrote, once it exits."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {
        k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")
    }
    process = subprocess.Popen(
        command, stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm-256color"}, start_new_session=True
    )
    os.close(slave)
    written = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{command} still running after {timeout_s} s; it wrote:\n{written.decode(errors='replace')}")
            if not select.select([master], [], [], remaining)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not chunk:
                break
            written += chunk
        return process.wait(timeout=10), written.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_jobs_tail_in_a_real_terminal_draws_progress_bars_and_streams_tokens(slow_cluster, hub):
    job = submit(slow_cluster.url, model=cold_model(hub, "admin-cli-tty"), prompt=PROMPT, max_tokens=8, temperature=0)
    code, screen = run_in_terminal(processes.hive_command("jobs", "tail", job["job_id"], "--url", slow_cluster.url), timeout_s=90)
    assert code == 0, screen
    assert "\x1b[?25l" in screen  # rich saw a terminal: it hid the cursor to redraw its bars live
    text = ANSI_ESCAPE.sub("", screen).replace("\r\n", "\n")
    assert "━" in text and "download" in text and "loading" in text and "layer 4/4" in text
    assert "8 tokens" in text
    output = status(slow_cluster.url, job["job_id"])["output"]
    assert output and output in text
