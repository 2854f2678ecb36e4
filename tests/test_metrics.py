"""``/metrics`` on the hive (cluster state, its streams) and on a worker (per-job
figures), scraped around real jobs from real processes and parsed with
prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests import processes
from tests.sse import events, follow, run_job, status, submit

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
#: Slow enough that a job is seen running, fast enough that short jobs take no time.
TOKEN_DELAY_MS = 20


@dataclass
class MeteredCluster:
    url: str
    worker_metrics_url: str
    queue: str


@pytest.fixture(scope="module")
def metered(redis_url, hub, log_dir, tmp_path_factory):
    """A hive and one worker serving its metrics, with a hub cache of its own, so
    every model is cold for it at first."""
    port, metrics_port, queue = processes.free_port(), processes.free_port(), "hive:test-metrics"
    hive = processes.start(
        "hive-metrics",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue),
        log_dir,
    )
    worker = processes.start(
        "worker-metrics",
        processes.hive_command(
            "worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--token-delay-ms", str(TOKEN_DELAY_MS), "--max-batch", "1"
        ),
        log_dir,
        env={
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path_factory.mktemp("hf-home-metrics")),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HIVE_METRICS_PORT": str(metrics_port),
        },
    )
    cluster = MeteredCluster(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", queue)
    try:
        processes.wait_until(
            lambda: processes.health(cluster.url).get("workers", 0) >= 1 and httpx.get(cluster.worker_metrics_url, timeout=5).is_success,
            processes.STARTUP_TIMEOUT_S,
            "metrics hive and worker",
            (hive, worker),
        )
        yield cluster
    finally:
        worker.stop()
        hive.stop()


class Scrape:
    """One scrape: each sample by name and labels."""

    def __init__(self, url: str):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        self.families = {f.name: f for f in text_string_to_metric_families(response.text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value for f in self.families.values() for s in f.samples}

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when it is not there (a labelled series not yet used)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


COMPLETED = {"kind": "inference", "outcome": "completed", "code": ""}
CANCELLED = {"kind": "inference", "outcome": "cancelled", "code": ""}


def test_a_cold_job_moves_every_worker_figure_by_its_own_numbers(metered, model_root):
    before = Scrape(metered.worker_metrics_url)
    [info] = before.families["hive_worker_info"].samples
    assert info.labels["device"] == "cpu" and info.labels["queue"] == metered.queue and info.value == 1

    job, received = run_job(metered.url, model="acme/tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    after = Scrape(metered.worker_metrics_url)
    body = {r.event: r.json() for r in events(received)}
    end, final = body["end"], status(metered.url, job["job_id"])
    assert final["state"] == "completed"

    def moved(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert moved("hive_jobs_finished_total", **COMPLETED) == 1
    assert moved("hive_generated_tokens_total") == end["tokens_out"] > 0
    assert moved("hive_time_to_first_token_seconds_count") == 1
    assert moved("hive_time_to_first_token_seconds_sum") == pytest.approx(end["ttft_ms"] / 1000)
    assert moved("hive_decode_tokens_per_second_count") == 1
    rate = (end["tokens_out"] - 1) / (end["decode_time_ms"] / 1000)
    assert moved("hive_decode_tokens_per_second_sum") == pytest.approx(rate)
    assert rate < 1000 / TOKEN_DELAY_MS  # the worker sleeps between tokens
    assert moved("hive_queue_wait_seconds_count") == 1
    assert moved("hive_queue_wait_seconds_sum") == pytest.approx(final["timings"]["queue_ms"] / 1000, abs=1e-3)
    assert moved("hive_model_load_seconds_count") == 1
    assert moved("hive_model_load_seconds_sum") == pytest.approx(body["ready"]["load_ms"] / 1000)
    # Every file of the model came from the hub, once.
    size = sum(f.stat().st_size for f in (model_root / "acme" / "tiny").iterdir())
    assert moved("hive_download_bytes_total") == size
    assert moved("hive_download_seconds_count") == 1

    # Warm now: a second job loads and downloads nothing.
    run_job(metered.url, model="acme/tiny", prompt=PROMPT, max_tokens=2)
    again = Scrape(metered.worker_metrics_url)
    assert again("hive_jobs_finished_total", **COMPLETED) - after("hive_jobs_finished_total", **COMPLETED) == 1
    assert again("hive_model_load_seconds_count") == after("hive_model_load_seconds_count")
    assert again("hive_download_bytes_total") == after("hive_download_bytes_total")


def test_the_hive_shows_queues_workers_and_streams_while_a_job_runs(metered):
    hive_metrics = f"{metered.url}/metrics"
    idle = Scrape(hive_metrics)
    assert idle("hive_redis_up") == 1
    assert idle("hive_workers", queue=metered.queue, state="idle") == 1
    assert idle("hive_workers", queue=metered.queue, state="busy") == 0
    assert idle("hive_queue_depth", queue=metered.queue) == 0
    worker_before = Scrape(metered.worker_metrics_url)
    streams = idle("hive_active_streams")

    running = submit(metered.url, model="acme/tiny", prompt=PROMPT, max_tokens=500, temperature=0)  # 10 s; greedy: no eos
    waiting, seen = None, []
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{metered.url}{running['sse_url']}") as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            seen.append(sse.data)
            if sse.event == "token" and waiting is None:
                # Generating, with this stream open: another job has to wait on the shared queue.
                waiting = submit(metered.url, model="acme/tiny", prompt=PROMPT, max_tokens=2)
                busy = Scrape(hive_metrics)
                assert busy("hive_active_streams") == streams + 1
                assert busy("hive_workers", queue=metered.queue, state="busy") == 1
                assert busy("hive_workers", queue=metered.queue, state="idle") == 0
                assert busy("hive_queue_depth", queue=metered.queue) == 1
                assert httpx.delete(f"{metered.url}/v1/inference/{running['job_id']}", timeout=10).status_code == 202
            if sse.data == "[DONE]":
                break
    assert waiting is not None and seen[-1] == "[DONE]"
    assert follow(metered.url, waiting["sse_url"])[-1].done

    processes.wait_until(lambda: Scrape(hive_metrics)("hive_active_streams") == streams, 10, "the streams to close")
    after = Scrape(hive_metrics)
    assert after("hive_queue_depth", queue=metered.queue) == 0
    assert after("hive_workers", queue=metered.queue, state="idle") == 1
    worker_after = Scrape(metered.worker_metrics_url)
    assert worker_after("hive_jobs_finished_total", **CANCELLED) - worker_before("hive_jobs_finished_total", **CANCELLED) == 1
    assert worker_after("hive_jobs_finished_total", **COMPLETED) - worker_before("hive_jobs_finished_total", **COMPLETED) == 1
    # The batch: one slot (--max-batch 1), empty again, and each job's wait for its slot counted.
    assert worker_after("hive_batch_capacity") == 1
    assert worker_after("hive_slot_wait_seconds_count") - worker_before("hive_slot_wait_seconds_count") == 2
    assert worker_after("hive_batch_size", model="acme/tiny") == 0 and worker_after("hive_kv_cache_bytes", model="acme/tiny") == 0


def test_a_job_that_fails_counts_under_its_error_code(metered):
    code = {"kind": "inference", "outcome": "failed", "code": "MODEL_NOT_FOUND"}
    before = Scrape(metered.worker_metrics_url)
    _, received = run_job(metered.url, model="acme/no-such-model", prompt=PROMPT)
    assert events(received)[-1].json()["code"] == "MODEL_NOT_FOUND"
    after = Scrape(metered.worker_metrics_url)
    assert after("hive_jobs_finished_total", **code) - before("hive_jobs_finished_total", **code) == 1
    assert after("hive_generated_tokens_total") == before("hive_generated_tokens_total")
    assert after("hive_time_to_first_token_seconds_count") == before("hive_time_to_first_token_seconds_count")


def test_jobs_the_hive_ends_itself_count_on_the_hive(idle_hive):
    """Cancelled while queued: no worker saw it, the hive's own counter has it."""
    url, _ = idle_hive
    cancelled = {"kind": "inference", "outcome": "cancelled", "code": "CANCELLED"}
    before = Scrape(f"{url}/metrics")
    job = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": PROMPT}).json()
    assert httpx.delete(f"{url}/v1/inference/{job['job_id']}").status_code == 200
    after = Scrape(f"{url}/metrics")
    assert after("hive_jobs_finished_total", **cancelled) - before("hive_jobs_finished_total", **cancelled) == 1


def test_every_app_has_a_registry_of_its_own(redis_url):
    from starlette.testclient import TestClient

    from hive.app import create_app
    from shared.settings import Settings

    settings = Settings(redis_url=redis_url, queue="hive:test-metrics-apps", hub_upstream="")
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        for client in (first, second):
            response = client.get("/metrics")
            assert response.status_code == 200
            families = {f.name for f in text_string_to_metric_families(response.text)}
            assert {"hive_active_streams", "hive_queue_depth", "hive_workers", "hive_redis_up"} <= families
        assert first.app.state.metrics.registry is not second.app.state.metrics.registry
