"""Continuous batching with real parts: one `hive worker` runs several jobs at once
in one batch, each streaming live, each with its own sampling and end; jobs join a
running batch and leave it; the batch keeps to its memory budget."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from rq.registry import StartedJobRegistry
from rq.worker import Worker

from tests import processes
from tests.conftest import DEMO_MODEL_DIR
from tests.sse import events, follow, run_job, status, submit

pytestmark = pytest.mark.e2e

MODEL = "hive-demo/tiny-llama"
PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "A journey of a thousand miles begins with a single step, and the bee went to the hive",
    # Longer than one step's prefill budget (128 tokens on the CPU): prefilled in chunks.
    " ".join(["The quick brown fox jumps over the lazy dog."] * 16),
]
MAX_BATCH = 4


def start_cluster(name, redis_url, hub, log_dir, hf_home, *worker_args):
    port = processes.free_port()
    queue = f"hive:test-{name}"
    hive = processes.start(
        f"hive-{name}", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir
    )
    worker = processes.start(
        f"worker-{name}",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", *worker_args),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, name, (hive, worker))
    return url, queue, hive, worker


@pytest.fixture(scope="module")
def batching(redis_url, hub, log_dir, tmp_path_factory):
    """A hive and one worker with 4 slots, 40 ms a step so that jobs overlap."""
    url, queue, hive, worker = start_cluster(
        "batching", redis_url, hub, log_dir, tmp_path_factory.mktemp("hf-batching"), "--max-batch", str(MAX_BATCH), "--token-delay-ms", "40"
    )
    yield url, queue, worker
    worker.stop()
    hive.stop()


def output(url: str, job_id: str) -> str:
    return status(url, job_id)["output"]


def together(url: str, bodies: list[dict]) -> list[tuple[dict, list]]:
    """Submits every body at once and follows each stream to its end."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: run_job(url, **body), bodies))


def overlapped(url: str, job_ids: list[str]) -> bool:
    """Whether the jobs ran at once: every one had started before any ended."""
    records = [status(url, j) for j in job_ids]
    return max(r["started_at"] for r in records) < min(r["finished_at"] for r in records)


def test_greedy_jobs_in_a_batch_give_exactly_what_each_gives_alone(batching):
    url, _, _ = batching
    bodies = [dict(model=MODEL, prompt=p, max_tokens=24 + 8 * k, temperature=0) for k, p in enumerate(PROMPTS)]
    alone = [output(url, run_job(url, **body)[0]["job_id"]) for body in bodies]
    ran = together(url, bodies)
    assert overlapped(url, [job["job_id"] for job, _ in ran])
    for (job, received), expected in zip(ran, alone):
        tokens = [r.json()["t"] for r in events(received) if r.event == "token"]
        assert "".join(tokens) == output(url, job["job_id"]) == expected
        assert [r.event for r in events(received)][-1] == "end" and received[-1].done


def test_seeded_sampled_jobs_are_reproducible_in_a_batch_and_their_text_stays_whole(batching):
    url, _, _ = batching
    # Hot sampling: the demo corpus's multi-byte words (München, ça) come up in pieces.
    bodies = [dict(model=MODEL, prompt=p, max_tokens=30, temperature=1.5, seed=7 + k) for k, p in enumerate(["Très bien 🙂 日本", "Hello", "Ünïcödé ✓"])]
    first = together(url, bodies)
    second = together(url, bodies)
    for (a, ra), (b, rb) in zip(first, second):
        text_a, text_b = output(url, a["job_id"]), output(url, b["job_id"])
        assert text_a == text_b
        assert "".join(r.json()["t"] for r in events(ra) if r.event == "token") == text_a
    assert len({output(url, a["job_id"]) for a, _ in first}) == 3  # each its own seed
    assert any(not output(url, a["job_id"]).isascii() for a, _ in first)  # multi-byte text came through whole


def test_stop_sequences_eos_and_max_tokens_hold_per_job_inside_a_batch(batching):
    url, _, _ = batching
    long_text = output(url, run_job(url, model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)[0]["job_id"])
    stop = long_text[12:16]
    bodies = [
        dict(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop]),
        dict(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0),
        dict(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0),
    ]
    (stopped, _), (short, _), (full, _) = together(url, bodies)
    stopped, short, full = (status(url, j["job_id"]) for j in (stopped, short, full))
    assert stopped["stop_reason"] == "stop_sequence" and stopped["output"] == long_text[: long_text.index(stop)]
    assert short["stop_reason"] == "max_tokens" and short["tokens_out"] == 3
    assert full["output"] == long_text and full["stop_reason"] in ("max_tokens", "eos")


def test_a_job_joins_a_running_batch_and_streams_at_once(batching):
    url, _, _ = batching
    long = submit(url, model=MODEL, prompt=PROMPTS[1], max_tokens=120, temperature=0)
    first_tokens = follow(url, long["sse_url"], limit=8)  # queued, ready, started, 5 tokens
    assert first_tokens[-1].event == "token"
    joined_at = time.monotonic()
    job, received = run_job(url, model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    first = next(r for r in received if r.event == "token")
    assert first.at - joined_at < 1.5  # not after the long job's 120 tokens (~5 s)
    assert status(url, long["job_id"])["state"] == "running"  # it was still going
    final = follow(url, long["sse_url"])
    assert status(url, long["job_id"])["tokens_out"] == 120 and final[-1].done


def test_a_cancel_inside_a_batch_leaves_the_others_intact(batching):
    url, _, _ = batching
    bodies = [dict(model=MODEL, prompt=p, max_tokens=40, temperature=0) for p in PROMPTS[:3]]
    alone = [output(url, run_job(url, **body)[0]["job_id"]) for body in bodies]
    jobs = [submit(url, **body) for body in bodies]
    follow(url, jobs[1]["sse_url"], limit=6)  # its third token
    cancelled_at = time.monotonic()
    assert httpx.delete(f"{url}/v1/inference/{jobs[1]['job_id']}", timeout=10).status_code == 202
    received = follow(url, jobs[1]["sse_url"])
    assert received[-1].at - cancelled_at < 2
    cancelled = status(url, jobs[1]["job_id"])
    assert cancelled["state"] == "cancelled" and cancelled["stop_reason"] == "cancelled"
    # At most one token after the DELETE: 40 ms a step, so about 3 tokens in.
    assert cancelled["tokens_out"] < 10
    for k in (0, 2):
        follow(url, jobs[k]["sse_url"])
        assert status(url, jobs[k]["job_id"])["output"] == alone[k]


def test_workers_api_and_rq_show_every_running_job(batching, redis_url):
    url, queue, _ = batching
    jobs = [submit(url, model=MODEL, prompt=PROMPTS[0], max_tokens=60, temperature=0) for _ in range(3)]
    for job in jobs:
        follow(url, job["sse_url"], limit=4)  # each has its first token
    workers = httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"]
    assert len(workers) == 1 and workers[0]["capacity"] == MAX_BATCH and workers[0]["state"] == "busy"
    def listed() -> list[dict]:
        return httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"][0]["jobs"]

    # Phases change between heartbeats (1 s): the next one shows all three in the batch.
    processes.wait_until(lambda: {j["phase"] for j in listed()} == {"running"}, 3, "a heartbeat")
    assert {j["job_id"] for j in listed()} == {j["job_id"] for j in jobs}
    assert httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"][0]["running"] == 3
    connection = redis.Redis.from_url(redis_url)
    started = set()
    for name in (queue, f"{queue}:w:{workers[0]['id']}"):
        started |= set(StartedJobRegistry(name, connection=connection).get_job_ids())
    assert {j["job_id"] for j in jobs} <= started  # RQ's own registry: each job started
    rq_workers = [w for w in Worker.all(connection=connection) if w.name.startswith(workers[0]["id"])]
    assert len(rq_workers) == MAX_BATCH and sum(w.get_state() == "busy" for w in rq_workers) == 3
    for job in jobs:
        follow(url, job["sse_url"])
    assert all(status(url, j["job_id"])["state"] == "completed" for j in jobs)


def test_a_job_past_its_timeout_leaves_the_batch_with_timeout_and_the_others_go_on(batching, redis_url, log_dir):
    """RQ's job timeout (TimerDeathPenalty on the job's slot thread) inside a batch: a
    second hive on the same queue submits with a 2 s timeout."""
    url, queue, _ = batching
    port = processes.free_port()
    strict = processes.start(
        "hive-batching-strict",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue, "--job-timeout-s", "2"),
        log_dir,
    )
    try:
        strict_url = f"http://127.0.0.1:{port}"
        processes.wait_until(lambda: processes.health(strict_url)["status"] == "ok", 30, "the strict hive", (strict,))
        body = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=150, temperature=0)  # 40 ms a step: 6 s
        alone = output(url, run_job(url, **{**body, "max_tokens": 80})[0]["job_id"])
        other = submit(url, **{**body, "max_tokens": 80})
        timed = submit(strict_url, **body)
        received = follow(strict_url, timed["sse_url"])
        error = events(received)[-1]
        assert error.event == "error" and error.json()["code"] == "TIMEOUT" and received[-1].done
        assert 0 < sum(r.event == "token" for r in received) < 150
        follow(url, other["sse_url"])
        assert status(url, other["job_id"])["output"] == alone
    finally:
        strict.stop()


def test_kill_9_under_a_batch_ends_every_follower_within_10_s(batching):
    url, _, worker = batching
    jobs = [submit(url, model=MODEL, prompt=p, max_tokens=200, temperature=0) for p in PROMPTS[:3]]
    for job in jobs:
        follow(url, job["sse_url"], limit=5)  # every one is generating
    os.kill(worker.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        ends = list(pool.map(lambda job: follow(url, job["sse_url"], timeout=15), jobs))
    for received in ends:
        error = [r for r in events(received) if r.event == "error"]
        assert error and error[-1].json()["code"] == "WORKER_LOST" and received[-1].done
        assert error[-1].at - killed_at < 10


@pytest.fixture(scope="module")
def tight(redis_url, hub, log_dir, tmp_path_factory):
    """A worker whose memory budget holds the demo model and the KV cache of two of
    the jobs below, not three."""
    import torch

    from worker.kv.cache import round_tokens
    from worker.model.loaded_models import weights_bytes

    weights = weights_bytes(DEMO_MODEL_DIR, torch.device("cpu"), "auto")
    per_token = 2 * 4 * 2 * 16 * 4  # K and V × 4 layers × 2 KV heads × 16 dims × fp32
    row = round_tokens(ROW_TOKENS) * per_token  # a row's room at its longest
    budget = weights + int(2.5 * row)
    url, queue, hive, worker = start_cluster(
        "tight", redis_url, hub, log_dir, tmp_path_factory.mktemp("hf-tight"), "--max-batch", "8", "--token-delay-ms", "40",
        "--max-memory", f"{budget}B",
    )
    yield url
    worker.stop()
    hive.stop()


#: Prompt + max_tokens of each job in the memory test.
ROW_TOKENS = 5 + 60


def test_a_batch_at_its_memory_budget_completes_every_job_and_a_job_that_never_fits_is_refused(tight):
    """Three jobs whose rows outgrow the budget together: one is preempted and
    recomputed (tests/test_prefix_cache.py checks the text against each alone), all
    three complete with the same greedy text; one that could never fit is refused."""
    url = tight
    prompt = "The quick brown fox"  # 5 tokens with BOS
    jobs = [submit(url, model=MODEL, prompt=prompt, max_tokens=60, temperature=0) for _ in range(3)]
    for job in jobs:
        follow(url, job["sse_url"])
    outcomes = [status(url, j["job_id"]) for j in jobs]
    assert [o["state"] for o in outcomes] == ["completed"] * 3
    assert len({o["output"] for o in outcomes}) == 1 and all(o["tokens_out"] == 60 for o in outcomes)
    huge, received = run_job(url, model=MODEL, prompt=prompt, max_tokens=2000, temperature=0)
    error = events(received)[-1]
    assert error.event == "error" and error.json()["code"] == "CONTEXT_TOO_LARGE"
    assert "KV cache" in error.json()["message"]
