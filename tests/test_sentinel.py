"""Hive on Redis Sentinel: a master, two replicas and three Sentinels (real
processes, tests/sentinel_cluster.py), a hive and a worker given a
``redis+sentinel://`` URL. Failovers happen under running jobs and followers:
a Sentinel-run one (the old master is demoted, answering its blocked clients
UNBLOCKED and its writers READONLY) and a master killed outright (it takes its
unreplicated writes with it)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis

from tests import processes
from tests.sentinel_cluster import SentinelCluster
from tests.sse import Unavailable, follow, lost_events, submit

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def ha(log_dir, hub, tmp_path_factory):
    """(the Sentinel cluster, the hive's URL, the hive, the worker)."""
    data = tmp_path_factory.mktemp("sentinel")
    cluster = SentinelCluster(log_dir, data)
    try:
        cluster.start()
        url, hive, worker = cluster.serve(hub.url, data / "hf", worker_args=("--token-delay-ms", "20", "--max-batch", "4"))
        yield cluster, url, hive, worker
    finally:
        cluster.stop()

def _on_replicas(cluster: SentinelCluster, key: str) -> int:
    master = cluster.master_port()
    count = 0
    for port, node in cluster.nodes.items():
        if port != master and node.process.poll() is None:
            with redis.Redis(port=port) as client:
                count += client.exists(key)
    return count


def _follow_in_background(url: str, jobs: list[dict]) -> tuple[list[threading.Thread], dict]:
    results: dict = {}

    def read(job: dict) -> None:
        # As EventSource does: a connection that breaks mid-stream is resumed from the
        # last event seen. What is still failing after that is the test's answer.
        received: list = []
        try:
            for attempt in range(20):
                try:
                    last_id = next((r.id for r in reversed(received) if r.id), None)
                    follow(url, job["sse_url"], last_id, timeout=60, into=received)
                    break
                except (httpx.TransportError, Unavailable) as e:  # a follower connecting mid-failover meets a 503
                    if attempt == 19:
                        raise
                    print(f"job {job['job_id']}: no stream after {len(received)} events ({e!r}); resuming")
                    time.sleep(0.5)  # the client's retry delay, shorter than the Retry-After of 2 s
            results[job["job_id"]] = received
        except Exception as e:  # reported by the test, not lost in a thread
            results[job["job_id"]] = e

    threads = [threading.Thread(target=read, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    return threads, results


def _submit_on_retry_after(url: str, timeout_s: float = 30, **body) -> dict:
    """A submit retried while the hive answers 503 with Retry-After, as a client
    would: until a master has a replica again after a failover (the hive's
    ``--redis-min-replicas``), new work is refused, never lost."""
    accepted: list[dict] = []

    def submitted() -> bool:
        response = httpx.post(f"{url}/v1/inference", json=body, timeout=10)
        assert response.status_code in (202, 503), response.text
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "REDIS_UNAVAILABLE" and response.headers["Retry-After"].isdigit()
            return False
        accepted.append(response.json())
        return True

    processes.wait_until(submitted, timeout_s, "a submit accepted")
    return accepted[0]


@pytest.mark.timeout(120)
def test_a_job_runs_and_its_submit_is_on_a_replica_before_the_202(ha):
    cluster, url, hive, worker = ha
    job = submit(url, model="acme/tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    # WAIT 1 before the 202: a replica holds the job already.
    assert _on_replicas(cluster, f"hive:job:{job['job_id']}") >= 1
    received = follow(url, job["sse_url"], timeout=60)
    assert received[-2].event == "end" and received[-2].json()["tokens_out"] == 8


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["sentinel-failover", "master-killed"])
def test_jobs_and_followers_ride_out_a_failover(ha, how):
    cluster, url, hive, worker = ha
    # The previous case's failover may still be settling: its new master's replica catching up.
    jobs = [_submit_on_retry_after(url, model="acme/tiny", prompt=PROMPT * (k + 1), max_tokens=150, temperature=0) for k in range(4)]
    threads, results = _follow_in_background(url, jobs)
    log_key = f"hive:job:{jobs[0]['job_id']}:events"
    with redis.Redis(port=cluster.master_port()) as client:
        processes.wait_until(lambda: client.xlen(log_key) >= 20, 60, "tokens flowing", (worker, hive))

    if how == "sentinel-failover":
        cluster.failover()
    else:
        cluster.wait_for_new_master(cluster.kill_master())

    # New work is accepted once the new master has a replica again (until then the
    # hive answers 503 with Retry-After, as a client would retry on).
    after = _submit_on_retry_after(url, model="acme/tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    for thread in threads:
        thread.join(90)
    lost = 0
    for job in jobs:
        received = results.get(job["job_id"], "still following after 90 s")
        assert isinstance(received, list), f"job {job['job_id']}: {received!r}"
        assert received[-1].done
        # No id goes backwards, none comes twice, and every hole is said out loud.
        lost += lost_events(received)
        # Each job carried on to its end, or ended clearly.
        assert received[-2].event in ("end", "error"), received[-2]
        if received[-2].event == "end":
            assert received[-2].json()["tokens_out"] == 150
    print(f"{how}: {lost} events lost over 4 streams")
    if how == "sentinel-failover":
        assert lost == 0  # a coordinated failover waits for the replica to catch up
    received = follow(url, after["sse_url"], timeout=60)
    assert received[-2].event == "end" and received[-2].json()["tokens_out"] == 5
    worker.check_alive()
    hive.check_alive()
    assert "Traceback" not in hive.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("refusal", ["no replica acknowledges", "the master refuses writes"])
def test_a_submit_short_of_replicas_is_refused_and_leaves_nothing(log_dir, tmp_path, refusal):
    """One Redis without replicas: ``--redis-min-replicas 1`` finds none to WAIT for;
    a master with min-replicas-to-write 1 refuses the write itself (NOREPLICAS)."""
    port = processes.free_port()
    extra = ["--min-replicas-to-write", "1"] if refusal == "the master refuses writes" else []
    node = processes.start(
        f"redis-lonely-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra], log_dir
    )
    redis_url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(port=port)
    hive_port = processes.free_port()
    url = f"http://127.0.0.1:{hive_port}"
    hive = processes.start(
        f"hive-min-replicas-{hive_port}",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(hive_port), "--redis-min-replicas", "1"),
        log_dir,
    )
    try:
        processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "hive", (hive, node))
        response = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": "x"}, timeout=10)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "REDIS_UNAVAILABLE" and "replica" in response.json()["error"]["message"]
        assert response.headers["Retry-After"].isdigit()
        # Nothing of the job: RQ's set of queue names may list the queue (as once a
        # queue has been used, whether it holds jobs or not), and fair share's
        # bookkeeping its key (whose youngest job no longer waits) and its counter.
        bookkeeping = (b"rq:queues", b"hive:fair-tags:", b"hive:fair:hive:inference:arrivals")
        assert [k for k in client.scan_iter() if not k.startswith(bookkeeping)] == []
    finally:
        client.close()
        hive.stop()
        node.stop()
