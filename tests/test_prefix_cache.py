"""Prefix caching through real processes: a hive with two API keys and one worker.
A repeated long prompt is found in the worker's cache (fewer prompt tokens computed,
an earlier first token, the same greedy text as with the cache off), a burst sharing
a system prompt computes it once, and one key never finds another's prompt."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shared import keys
from shared.prefix_affinity import prefix_hashes
from shared.spec import InferenceRequest
from tests import processes
from tests.sse import events, follow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KEY_A, KEY_B = "key-a-prefix-0123456789", "key-b-prefix-0123456789"
# About 950 tokens with the tiny tokenizer: four prefill steps computed, one found.
LONG = "You are a careful assistant. Answer briefly, cite nothing, and keep to the facts. " * 15


@pytest.fixture(scope="module")
def keyed(redis_url, hub, log_dir, tmp_path_factory):
    """A hive with two API keys and a worker with the prefix cache on (20 ms a step,
    so that a prefill's steps show in its first-token time)."""
    keys_file = tmp_path_factory.mktemp("prefix-keys") / "keys.txt"
    keys_file.write_text(f"{KEY_A}\n{KEY_B}\n")
    port, metrics_port, queue = processes.free_port(), processes.free_port(), "hive:test-prefix"
    hive = processes.start(
        "hive-prefix",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue),
        log_dir,
        env={"HIVE_API_KEYS": f"@{keys_file}"},
    )
    worker = processes.start(
        "worker-prefix",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--max-batch", "8",
                               "--token-delay-ms", "20", "--metrics-port", str(metrics_port)),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path_factory.mktemp("hf-prefix")), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "prefix cluster", (hive, worker))
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    worker.stop()
    hive.stop()


def run(url: str, key: str, **body) -> tuple[dict, dict]:
    """Submits a greedy job as ``key`` and follows it: (its end event, its status)."""
    body = {"model": "acme/tiny", "max_tokens": 8, "temperature": 0, **body}
    headers = {"Authorization": f"Bearer {key}"}
    response = httpx.post(f"{url}/v1/inference", json=body, headers=headers, timeout=10)
    assert response.status_code == 202, response.text
    job = response.json()
    received = events(follow(url, job["sse_url"]))
    assert received[-1].event == "end", received[-1]
    status = httpx.get(f"{url}/v1/inference/{job['job_id']}", headers=headers, timeout=10).json()
    return received[-1].json(), status


def test_a_repeated_prompt_is_found_in_the_cache_answers_alike_and_starts_sooner(keyed):
    url, metrics_url = keyed
    first, first_status = run(url, KEY_A, prompt=LONG)
    prompt_tokens = first_status["prompt_tokens"]
    assert prompt_tokens > 900 and first["cached_tokens"] == 0
    again, again_status = run(url, KEY_A, prompt=LONG)
    # Every full 16-token block of the prompt, never its last token.
    assert again["cached_tokens"] == again_status["cached_tokens"] == min(prompt_tokens // 16 * 16, prompt_tokens - 1)
    assert again_status["output"] == first_status["output"]
    assert again["ttft_ms"] < first["ttft_ms"], (again["ttft_ms"], first["ttft_ms"])

    # The per-request switch: nothing read (and nothing left), the same greedy text.
    off, off_status = run(url, KEY_A, prompt=LONG, prefix_cache=False)
    assert off["cached_tokens"] == 0 and off_status["output"] == first_status["output"]
    # Another key finds nothing of key A's: a hit's timing would tell it the prompt.
    other, other_status = run(url, KEY_B, prompt=LONG)
    assert other["cached_tokens"] == 0 and other_status["output"] == first_status["output"]

    # The OpenAI API reports it where clients read it.
    chat = {"model": "acme/tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "Hi"}]}
    answers = [
        httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60).json() for _ in range(2)
    ]
    assert answers[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= answers[1]["usage"]["prompt_tokens"] - 16
    assert answers[1]["choices"][0]["message"] == answers[0]["choices"][0]["message"]

    metrics = httpx.get(metrics_url, timeout=5).text
    hits = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("hive_prefix_cache_hits_total{"))
    queries = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("hive_prefix_cache_queries_total{"))
    assert hits >= again["cached_tokens"] and queries >= 4 * prompt_tokens
    assert 'hive_kv_cache_used_bytes{model="acme/tiny"}' in metrics


def test_a_burst_sharing_a_system_prompt_computes_it_once_and_answers_as_alone(keyed):
    url, _ = keyed
    system = "Burst. " + LONG  # a prefix no earlier test left in the cache
    questions = [f"Question {k}: what is {k} plus {k}?" for k in range(6)]

    def chat(question: str, cache: bool) -> tuple[dict, dict]:
        return run(url, KEY_A, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], prefix_cache=cache)

    with ThreadPoolExecutor(len(questions)) as pool:  # submitted together, as a chat service's users would
        burst = list(pool.map(lambda q: chat(q, True), questions))
    alone = [chat(q, False) for q in questions]
    for (end, status), (_, reference) in zip(burst, alone):
        assert status["output"] == reference["output"]
    cached = sorted(end["cached_tokens"] for end, _ in burst)
    # One of them computed the shared prompt; the others waited for its blocks and
    # found all of them (the system prompt's full blocks; each question is ~45 tokens).
    prompt_tokens = burst[0][1]["prompt_tokens"]
    assert cached[0] == 0 and len(set(cached[1:])) == 1 and cached[1] >= prompt_tokens - 64, (cached, prompt_tokens)


@pytest.fixture(scope="module")
def two_workers(redis_url, hub, log_dir, tmp_path_factory):
    """A hive (no keys) and two workers with one slot each, sharing one hub cache."""
    port, queue = processes.free_port(), "hive:test-affinity"
    url = f"http://127.0.0.1:{port}"
    hive = processes.start("hive-affinity", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir)
    hf_home = str(tmp_path_factory.mktemp("hf-affinity"))
    workers = {}
    for n in range(2):
        proc = processes.start(
            f"worker-affinity-{n}",
            processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--max-batch", "1",
                                   "--name", f"affinity-{n}"),
            log_dir,
            env={"HF_ENDPOINT": hub.url, "HF_HOME": hf_home, "HF_HUB_DISABLE_TELEMETRY": "1"},
        )
        workers[f"affinity-{n}"] = proc
    processes.wait_until(lambda: processes.health(url).get("workers", 0) == 2, processes.STARTUP_TIMEOUT_S, "two workers", (hive, *workers.values()))
    yield url, queue, workers
    for proc in (*workers.values(), hive):
        proc.stop()


def test_a_prefix_group_follows_the_worker_that_holds_it_until_that_worker_dies(two_workers, redis_client):
    url, queue, workers = two_workers
    groups = {g: f"Group {g} system prompt. " + LONG for g in "AB"}

    def worker_for(group: str, question: str = "Hi") -> str:
        _, status = run(url, KEY_A, messages=[{"role": "system", "content": groups[group]}, {"role": "user", "content": question}])
        return status["worker"]

    # Both workers warm, so that either can take a job for the model at once.
    with ThreadPoolExecutor(2) as pool:  # one slot each: two long jobs at once load the model on both
        warm = list(pool.map(lambda k: run(url, KEY_A, prompt=f"warm {k}", max_tokens=300), range(2)))
    assert {status["worker"] for _, status in warm} == set(workers)
    first = {g: worker_for(g) for g in "AB"}
    assert first["A"] != first["B"]  # two new prefixes, two idle workers: one each
    for k in range(3):
        for g in "AB":
            assert worker_for(g, f"Question {k}") == first[g]
    # Each cut of the prompt names its worker in Redis, for any hive to route alike.
    held = [redis_client.get(key) for key in redis_client.scan_iter(f"hive:prefix:{queue}:*")]
    assert held and set(held) <= set(first.values())

    victim = first["A"]
    workers[victim].process.kill()
    workers[victim].process.wait()
    processes.wait_until(lambda: processes.health(url).get("workers") == 1, 10, "the dead worker dropped")
    survivor = next(name for name in workers if name != victim)
    assert worker_for("A", "After") == survivor
    # The dead worker's affinity is gone: A's prefixes name the survivor now.
    request = InferenceRequest(model="acme/tiny", messages=[{"role": "system", "content": groups["A"]}, {"role": "user", "content": "After"}])
    cuts = [keys.prefix_affinity(queue, h) for h in prefix_hashes(request, "local")]
    assert len(cuts) >= 2 and [redis_client.get(key) for key in cuts] == [survivor] * len(cuts)


def test_a_batch_at_its_memory_budget_preempts_and_every_job_answers_as_alone(redis_url, hub, log_dir, tmp_path):
    """A worker whose memory holds acme/tiny and three rows of 192 tokens runs four
    jobs of ~170 tokens at once: the newest is preempted when the rows grow, and
    recomputed later; each job's text is the text it has alone."""
    config = json.loads((hub.root / "acme" / "tiny" / "config.json").read_text())
    per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"]) * 4
    weights = sum(f.stat().st_size for f in (hub.root / "acme" / "tiny").glob("*.safetensors"))
    port, metrics_port, queue = processes.free_port(), processes.free_port(), "hive:test-tight"
    url = f"http://127.0.0.1:{port}"
    hive = processes.start("hive-tight", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue), log_dir)
    worker = processes.start(
        "worker-tight",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--max-batch", "4",
                               "--max-memory", str(weights + 3 * 192 * per_token), "--metrics-port", str(metrics_port)),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "tight cluster", (hive, worker))
        prompts = [f"The quick brown fox {k}" for k in range(4)]
        body = {"max_tokens": 150, "prefix_cache": False}  # nothing found in the cache: every preempted token is recomputed
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda p: run(url, KEY_A, prompt=p, **body), prompts))
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        preempted = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("hive_preemptions_total{"))
        assert preempted >= 1
        for prompt, (end, status) in zip(prompts, together):
            assert end["tokens_out"] == 150
            _, alone = run(url, KEY_A, prompt=prompt, **body)
            assert status["output"] == alone["output"]
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()
        hive.stop()
