"""The fleet with real worker processes: warm routing between two workers and two
models, memory budgets and eviction, keep-alive, and the workers and models API."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests import processes
from tests.sse import events, follow, status, submit

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


def start_cluster(name: str, redis_url: str, hub, log_dir, hf_home, workers: int, *worker_args: str):
    port, queue = processes.free_port(), f"hive:test-{name}"
    url = f"http://127.0.0.1:{port}"
    hive = processes.start(f"hive-{name}", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir)
    procs = [
        processes.start(
            f"worker-{name}-{n}",
            # One slot each: these tests are about which worker a job goes to when one is busy.
            processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--max-batch", "1", *worker_args),
            log_dir,
            env={"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home)},
        )
        for n in range(workers)
    ]
    processes.wait_until(lambda: len(list_workers(url)) == workers, processes.STARTUP_TIMEOUT_S, name, (hive, *procs))
    return url, hive, procs


def list_workers(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/workers", timeout=5).json()["workers"]


def models_on(url: str) -> dict[str, list[str]]:
    """Worker id → the models it holds loaded."""
    return {w["id"]: sorted(m["model"] for m in w["models"]) for w in list_workers(url)}


def kinds(received) -> list[str]:
    return [r.event for r in events(received)]


@pytest.fixture(scope="module")
def pair(redis_url, hub, log_dir, tmp_path_factory):
    """A hive and two workers sharing one hub cache, 50 ms a token."""
    url, hive, workers = start_cluster("pair", redis_url, hub, log_dir, tmp_path_factory.mktemp("hf-pair"), 2, "--token-delay-ms", "50")
    yield url, workers
    for proc in (*workers, hive):
        proc.stop()


def test_a_job_runs_warm_on_the_worker_that_holds_its_model(pair):
    url, _ = pair
    job = submit(url, model="acme/fleet-a", prompt=PROMPT, max_tokens=3)
    received = follow(url, job["sse_url"])
    assert {"download", "loading"} <= set(kinds(received))
    holder = status(url, job["job_id"])["worker"]

    for _ in range(3):
        job = submit(url, model="acme/fleet-a", prompt=PROMPT, max_tokens=3)
        received = follow(url, job["sse_url"])
        assert kinds(received)[:3] == ["queued", "ready", "started"]
        assert next(r.json() for r in received if r.event == "ready")["warm"] is True
        assert status(url, job["job_id"])["worker"] == holder


def test_no_job_waits_behind_a_busy_worker_while_another_is_idle(pair):
    url, _ = pair
    first = submit(url, model="acme/fleet-a", prompt=PROMPT, max_tokens=400, temperature=0)  # 20 s on its holder
    processes.wait_until(lambda: status(url, first["job_id"])["state"] == "running", 20, "the first job running")
    second = submit(url, model="acme/fleet-a", prompt=PROMPT, max_tokens=3)
    follow(url, second["sse_url"])
    one, two = status(url, first["job_id"]), status(url, second["job_id"])
    assert two["worker"] != one["worker"]
    assert two["timings"]["queue_ms"] < 1000
    assert one["state"] == "running"  # the second did not wait for the first
    assert httpx.delete(f"{url}/v1/inference/{first['job_id']}").status_code == 202
    follow(url, first["sse_url"])


def test_workers_and_models_api_show_the_fleet(pair):
    url, _ = pair
    follow(url, submit(url, model="acme/fleet-b", prompt=PROMPT, max_tokens=2)["sse_url"])
    workers = list_workers(url)
    assert len(workers) == 2
    for w in workers:
        assert w["state"] == "idle" and w["current_job"] is None and w["device"] == "cpu"
        assert w["memory"]["budget"] > 0 and w["memory"]["used"] == sum(m["size_bytes"] for m in w["models"])
        assert all(m["size_bytes"] > 0 and m["last_used"] > 0 for m in w["models"])
    held = models_on(url)
    assert all("acme/fleet-a" in models for models in held.values())  # both loaded it above
    assert sum("acme/fleet-b" in models for models in held.values()) == 1

    listing = httpx.get(f"{url}/v1/models").json()
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert sorted(by_id["acme/fleet-a"]["loaded_on"]) == sorted(held)
    assert len(by_id["acme/fleet-b"]["loaded_on"]) == 1
    assert by_id["acme/fleet-a"]["cached_on"] and by_id["acme/fleet-a"]["size_bytes"] > 0


def test_two_jobs_for_two_models_never_claim_the_same_idle_worker(pair):
    """An idle worker holding both models is idle for each; two jobs submitted
    together must still run on both workers at once."""
    url, _ = pair

    def pair_of_jobs() -> tuple[dict, dict]:
        processes.wait_until(lambda: {w["state"] for w in list_workers(url)} == {"idle"}, 5, "both workers idle")
        with ThreadPoolExecutor(2) as pool:  # submitted together, as two clients would
            a, b = pool.map(lambda model: submit(url, model=model, prompt=PROMPT, max_tokens=6), ("acme/fleet-a", "acme/fleet-b"))
        follow(url, a["sse_url"])
        follow(url, b["sse_url"])
        return status(url, a["job_id"]), status(url, b["job_id"])

    # Each worker loads both models (so it is idle for both): while one worker is
    # busy with a long job on a model, the next job for that model loads it on the other.
    for model in ("acme/fleet-a", "acme/fleet-b", "acme/fleet-a", "acme/fleet-b"):
        if all(models == ["acme/fleet-a", "acme/fleet-b"] for models in models_on(url).values()):
            break
        long = submit(url, model=model, prompt=PROMPT, max_tokens=400)
        # Queued, then loading on a worker: a busy CI machine has taken over 20 s for that.
        processes.wait_until(lambda: status(url, long["job_id"])["state"] == "running", 60, f"long job {long['job_id']} running")
        follow(url, submit(url, model=model, prompt=PROMPT, max_tokens=2)["sse_url"])
        httpx.delete(f"{url}/v1/inference/{long['job_id']}")
        follow(url, long["sse_url"])
    assert all(models == ["acme/fleet-a", "acme/fleet-b"] for models in models_on(url).values())
    for _ in range(5):
        one, two = pair_of_jobs()
        assert one["worker"] != two["worker"]
        assert two["picked_at"] < one["finished_at"] and one["picked_at"] < two["finished_at"]


def test_a_killed_worker_drops_off_within_three_heartbeats(pair):
    url, workers = pair
    victim = workers[1]
    name = next(w["id"] for w in list_workers(url) if w["id"].endswith(f":{victim.process.pid}"))
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    processes.wait_until(lambda: name not in models_on(url), 5, "the dead worker to drop off")
    assert len(list_workers(url)) == 1
    # Its models no longer count as loaded, and a job for them still runs.
    job = submit(url, model="acme/fleet-b", prompt=PROMPT, max_tokens=2)
    assert kinds(follow(url, job["sse_url"], timeout=30))[-1] == "end"


@pytest.fixture(scope="module")
def small(redis_url, hub, log_dir, tmp_path_factory):
    """One worker whose budget (1 MiB) holds one tiny model (0.7 MB), not two."""
    url, hive, workers = start_cluster("small", redis_url, hub, log_dir, tmp_path_factory.mktemp("hf-small"), 1, "--max-memory", "1MiB")
    yield url, workers[0]
    for proc in (*workers, hive):
        proc.stop()


def test_the_least_recently_used_model_makes_room(small):
    url, worker = small
    follow(url, submit(url, model="acme/budget-a", prompt=PROMPT, max_tokens=2)["sse_url"])
    assert list(models_on(url).values()) == [["acme/budget-a"]]
    received = follow(url, submit(url, model="acme/budget-b", prompt=PROMPT, max_tokens=2)["sse_url"])
    assert kinds(received)[-1] == "end"
    assert list(models_on(url).values()) == [["acme/budget-b"]]
    assert "unloaded acme/budget-a@main (making room for acme/budget-b)" in worker.log()


def test_a_model_too_large_for_the_worker_fails_fast(small):
    url, _ = small
    received = follow(url, submit(url, model="acme/big", prompt=PROMPT, max_tokens=2)["sse_url"])
    error = events(received)[-1]
    assert error.event == "error" and error.json()["code"] == "MODEL_TOO_LARGE" and "MiB" in error.json()["message"]
    assert "download" not in kinds(received) and "loading" not in kinds(received)  # nothing downloaded


def test_keep_alive_unloads_idle_models(small):
    url, _ = small
    # The `end` event goes out first; the unload follows at once.
    follow(url, submit(url, model="acme/budget-a", prompt=PROMPT, max_tokens=2, keep_alive=0)["sse_url"])
    processes.wait_until(lambda: list(models_on(url).values()) == [[]], 2, "keep_alive 0 to unload")
    follow(url, submit(url, model="acme/budget-a", prompt=PROMPT, max_tokens=2, keep_alive="2s")["sse_url"])
    processes.wait_until(lambda: list(models_on(url).values()) == [["acme/budget-a"]], 2, "the model held")
    processes.wait_until(lambda: list(models_on(url).values()) == [[]], 5, "the keep-alive to run out")


def test_pull_then_delete_a_model(small):
    url, _ = small
    job = httpx.post(f"{url}/v1/models/pull", json={"model": "acme/pulled"}).json()
    received = follow(url, job["sse_url"])
    assert "download" in kinds(received) and events(received)[-1].json()["stop_reason"] == "pulled"
    assert status(url, job["job_id"])["kind"] == "pull"
    listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert listed["acme/pulled"]["cached_on"] and not listed["acme/pulled"]["loaded_on"]

    response = httpx.delete(f"{url}/v1/models/acme/pulled")
    assert response.status_code == 202 and response.json()["deleting_on"]
    processes.wait_until(
        lambda: "acme/pulled" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}, 10, "the model deleted"
    )
    assert httpx.delete(f"{url}/v1/models/acme/pulled").status_code == 404


def test_a_loaded_model_cannot_be_deleted(small):
    url, _ = small
    follow(url, submit(url, model="acme/budget-b", prompt=PROMPT, max_tokens=2, keep_alive=-1)["sse_url"])
    response = httpx.delete(f"{url}/v1/models/acme/budget-b")
    assert response.status_code == 409 and response.json()["error"]["code"] == "MODEL_IN_USE"
