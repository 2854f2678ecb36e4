"""A worker never wedges, and a job ends once (issue 19).

- Its Redis connections are a budget, not one more per model held: each loaded model
  kept one checked out of the worker's pool, so with the default keep-alive the 47th
  model used the pool up, and from then on every heartbeat and lease renewal failed
  while the process stayed up.
- A worker whose heartbeats fail while Redis answers exits (70) for its supervisor to
  restart it; through an outage it waits and recovers; /livez and `hive worker --check`
  follow the heartbeat.
- One terminal state per job: a worker that finishes a job after a hive's reaper took
  it over (its lease ran out) leaves the record as the reaper wrote it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid

import httpx
import pytest
import redis

from hive.jobs.service import JobService
from shared import job_record, keys
from shared.clock import RedisClock
from shared.connections import async_client
from shared.events import End, Token
from shared.settings import Settings
from shared.spec import JobState
from tests import processes, sse
from tests.tiny_models import build_model
from worker.cluster.liveness import EXIT_WEDGED, WEDGED_AFTER_S, Liveness
from worker.cluster.reporter import JobReporter

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
    url, _, hive, worker = processes.start_hive_and_worker("many-models", redis_url, hub_url, log_dir, tmp_path / "hf")
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


def test_an_end_written_after_the_reaper_took_the_job_over_is_dropped(redis_url):
    """The race itself, with the real scripts on a real Redis: a worker's end that comes
    after a hive's reaper claimed the job (its lease ran out) writes nothing."""
    connection = redis.Redis.from_url(redis_url)
    clock = RedisClock(connection)
    clock.measure()
    settings = Settings(queue="hive:test-late-end")
    service = JobService(settings, async_client(redis_url), connection, clock)
    late, on_time = (uuid.uuid4().hex for _ in range(2))
    for job_id in (late, on_time):
        connection.hset(keys.job(job_id), mapping={job_record.STATE: "running", job_record.WORKER: "w", job_record.SPEC: "{}"})
    try:
        reporters = {job_id: JobReporter(connection, clock, job_id, settings.job_ttl_s) for job_id in (late, on_time)}
        for reporter in reporters.values():
            reporter.emit(Token("a", 0))  # a token out: the reaper ends the job rather than retry it
        # The reaper claims the lost job as hive/jobs/reaper.py does, then ends it.
        assert connection.zrem(keys.RUNNING, late) == 1
        assert service.worker_lost(late) == "failed"

        assert reporters[late].finish(End(1, 1.0, 1.0, "max_tokens"), JobState.completed, output="a") is False
        record = sse_status_of(connection, late)
        assert record[job_record.STATE] == "failed" and record[job_record.ERROR_CODE] == "WORKER_LOST"
        assert job_record.OUTPUT not in record
        assert [e for e in event_types(connection, late) if e in ("end", "error")] == ["error"]

        assert reporters[on_time].finish(End(1, 1.0, 1.0, "max_tokens"), JobState.completed, output="a") is True
        record = sse_status_of(connection, on_time)
        assert record[job_record.STATE] == "completed" and record[job_record.OUTPUT] == "a"
        assert event_types(connection, on_time)[-1] == "end"
        assert connection.zscore(keys.RUNNING, on_time) is None  # the lease was given back with the end
    finally:
        connection.close()


def sse_status_of(connection: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in connection.hgetall(keys.job(job_id)).items()}


def event_types(connection: redis.Redis, job_id: str) -> list[str]:
    return [fields[b"e"].decode() for _, fields in connection.xrange(keys.job_events(job_id))]


@pytest.mark.timeout(120)
def test_a_worker_paused_past_its_lease_leaves_the_job_as_the_reaper_ended_it(redis_url, hub, log_dir, tmp_path):
    """SIGSTOP in the middle of a job, past its lease: the hive ends it WORKER_LOST; then
    SIGCONT: the worker gives the job up (or finds its end too late), the record keeps
    saying WORKER_LOST, the stream ends once, and the worker serves the next job."""
    url, _, hive, worker = processes.start_hive_and_worker("paused", redis_url, hub.url, log_dir, tmp_path / "hf", "--token-delay-ms", "100")
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "hive and worker", (hive, worker))
        job = sse.submit(url, model="acme/tiny", prompt="Hello", max_tokens=40, temperature=0)
        seen = sse.follow(url, job["sse_url"], limit=30)
        assert [r.event for r in seen].count("token") >= 1
        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            processes.wait_until(lambda: sse.status(url, job["job_id"])["state"] == "failed", 30, "the reaper ending the job", (hive,))
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)
        processes.wait_until(
            lambda: f"job {job['job_id']}: abandoned" in worker.log() or f"job {job['job_id']}: its completed came too late" in worker.log(),
            30, "the worker giving the job up", (worker,),
        )
        final = sse.status(url, job["job_id"])
        assert final["state"] == "failed" and final["error"]["code"] == "WORKER_LOST"
        ends = [r.event for r in sse.follow(url, job["sse_url"]) if r.event in ("end", "error")]
        assert ends == ["error"]

        after, _ = sse.run_job(url, model="acme/tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert sse.status(url, after["job_id"])["state"] == "completed"
        assert sse.status(url, job["job_id"])["state"] == "failed"  # still: nothing came late
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
        for proc in (worker, hive):
            proc.stop()


class _Presence:
    """What the watchdog reads of worker/cluster/presence.py."""

    def __init__(self, last_beat_at: float, error: str | None):
        self.last_beat_at = last_beat_at
        self.last_beat_error = error


@pytest.mark.parametrize("redis_up", [True, False], ids=["redis-answers", "redis-away"])
def test_the_watchdog_exits_a_wedged_worker_and_waits_out_an_outage(redis_url, redis_up):
    """Heartbeats failing while Redis answers a connection of the watchdog's own: wedged,
    exit 70, once they have failed for WEDGED_AFTER_S since Redis answers (a healed
    partition gives the heartbeat that long). Redis away: an outage, waited out."""
    url = redis_url if redis_up else f"redis://127.0.0.1:{processes.free_port()}/0"
    now = [1000.0]
    exits = []
    stale = Liveness(_Presence(now[0] - 30, "No connection available."), url, exit=exits.append, clock=lambda: now[0])
    assert not stale.alive() and stale.status()["last_error"] == "No connection available."
    assert stale.check_once() is False  # Redis answers (or not) from now on
    now[0] += WEDGED_AFTER_S / 2
    assert stale.check_once() is False and exits == []
    now[0] += WEDGED_AFTER_S
    assert stale.check_once() is redis_up
    assert exits == ([EXIT_WEDGED] if redis_up else [])

    fresh = Liveness(_Presence(now[0] - 0.5, None), redis_url, exit=exits.append, clock=lambda: now[0])
    assert fresh.alive() and fresh.check_once() is False


def check(metrics_port: int) -> subprocess.CompletedProcess:
    return processes.run_hive("worker", "--check", "--metrics-port", str(metrics_port), timeout=30)


@pytest.mark.timeout(120)
def test_liveness_follows_the_heartbeat_through_a_redis_outage(hub, log_dir, tmp_path):
    """/livez and `hive worker --check` fail while heartbeats fail (Redis stopped), and
    pass again once Redis is back: the worker recovers on its own, it does not exit."""
    redis_port = processes.free_port()
    redis_proc = processes.start_redis_on(redis_port, log_dir)
    metrics_port = processes.free_port()
    worker = processes.start(
        "worker-liveness",
        processes.hive_command("worker", "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--queue", "hive:test-liveness",
                               "--device", "cpu", "--metrics-port", str(metrics_port)),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    livez = f"http://127.0.0.1:{metrics_port}/livez"
    try:
        processes.wait_until(lambda: httpx.get(livez, timeout=2).status_code == 200, processes.STARTUP_TIMEOUT_S, "worker alive", (worker,))
        alive = check(metrics_port)
        assert alive.returncode == 0 and alive.stdout.startswith("worker alive: last heartbeat"), alive

        redis_proc.stop()
        processes.wait_until(lambda: httpx.get(livez, timeout=2).status_code == 503, 20, "liveness failing", (worker,))
        dead = check(metrics_port)
        assert dead.returncode == 1 and "worker not alive" in dead.stderr, dead
        assert httpx.get(livez, timeout=2).json()["last_error"]

        redis_proc = processes.start_redis_on(redis_port, log_dir)
        processes.wait_until(lambda: httpx.get(livez, timeout=2).status_code == 200, 30, "liveness back", (worker,))
        assert check(metrics_port).returncode == 0
        assert "wedged" not in worker.log()
    finally:
        worker.stop()
        redis_proc.stop()
