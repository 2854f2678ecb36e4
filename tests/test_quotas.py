"""Idempotent submits and per-key limits, against a real `hive serve` with API keys
and a key-limits file, on a real redis-server. No worker serves its queue, so its
jobs stay in flight (queued) until cancelled."""

from __future__ import annotations

import concurrent.futures
import json
import uuid

import httpx
import pytest
import redis

from tests import processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

RATED, TEAM_B, FREE, OTHER = "key-rated-0123456789", "key-team-b-0123456789", "key-free-0123456789", "key-other-0123456789"
BODY = {"model": "acme/tiny", "prompt": "Hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def hive(redis_url, log_dir, tmp_path_factory):
    """(URL, queue): keys RATED (3 jobs a minute), TEAM_B (2 in flight, named in the
    file), FREE and OTHER (no limits)."""
    limits = tmp_path_factory.mktemp("limits") / "keys.json"
    limits.write_text(json.dumps({RATED: {"rate_per_min": 3}, TEAM_B: {"name": "team-b", "max_in_flight": 2}}))
    port = processes.free_port()
    queue = f"hive:test-quotas-{uuid.uuid4().hex[:6]}"
    command = processes.hive_command(
        "serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue,
        "--api-keys", f"{RATED},{TEAM_B},{FREE},{OTHER}", "--key-limits", str(limits),
    )
    proc = processes.start("hive-quotas", command, log_dir)
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "hive", (proc,))
    yield url, queue
    proc.stop()


def post(url: str, key: str, body: dict = BODY, idempotency_key: str | None = None, path: str = "/v1/inference") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=10)


def rq_jobs(redis_url: str, queue: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return client.llen(f"rq:queue:{queue}")


def test_ten_concurrent_posts_with_one_key_make_one_job(hive, redis_url):
    url, queue = hive
    before = rq_jobs(redis_url, queue)
    key = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(url, FREE, idempotency_key=key), range(10)))
    assert rq_jobs(redis_url, queue) == before + 1
    accepted = [a for a in answers if a.status_code == 202]
    assert {a.status_code for a in answers} <= {202, 409} and accepted
    assert len({a.json()["job_id"] for a in accepted}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") != "true" for a in accepted) == 1
    for answer in answers:
        if answer.status_code == 409:
            assert answer.json()["error"]["code"] == "IDEMPOTENCY_KEY_IN_USE" and answer.headers["Retry-After"] == "1"
    # Later, the same key and body: the first answer itself, marked as a replay.
    first = next(a for a in accepted if a.headers.get("Idempotent-Replayed") != "true")
    again = post(url, FREE, idempotency_key=key)
    assert again.status_code == 202 and again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"


def test_the_key_belongs_to_its_api_key_and_to_one_request(hive):
    url, _ = hive
    key = uuid.uuid4().hex
    mine, theirs = post(url, FREE, idempotency_key=key), post(url, OTHER, idempotency_key=key)
    assert mine.status_code == theirs.status_code == 202 and mine.json()["job_id"] != theirs.json()["job_id"]
    # Key order and spacing do not make another request; another prompt does.
    assert post(url, FREE, dict(reversed(BODY.items())), idempotency_key=key).json()["job_id"] == mine.json()["job_id"]
    other = post(url, FREE, {**BODY, "prompt": "Goodbye"}, idempotency_key=key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert post(url, FREE, idempotency_key="k" * 256).json()["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"
    # A request refused before its job was written stores nothing: its retry succeeds.
    refused = post(url, FREE, {**BODY, "max_tokens": -1}, idempotency_key="retry-" + key)
    assert refused.status_code == 422
    assert post(url, FREE, idempotency_key="retry-" + key).status_code == 202


def test_openai_posts_replay_the_same_job(hive):
    url, _ = hive
    key = uuid.uuid4().hex
    body = {"model": "acme/tiny", "prompt": "Hello", "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {FREE}", "Idempotency-Key": key}
    job_ids = []
    for _ in range(2):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=10) as response:
            assert response.status_code == 200
            job_ids.append(response.headers["X-Hive-Job-Id"])
            replayed = response.headers.get("Idempotent-Replayed")
    assert job_ids[0] == job_ids[1] and replayed == "true"


def test_a_key_past_its_rate_gets_429_and_others_do_not(hive):
    url, _ = hive
    answers = [post(url, RATED) for _ in range(3)]
    assert [a.status_code for a in answers] == [202] * 3
    assert answers[0].headers["RateLimit-Policy"] == '"rate";q=3;w=60'
    assert answers[-1].headers["RateLimit"].startswith('"rate";r=0;')
    refused = post(url, RATED)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RATE_LIMITED"
    assert refused.headers["Retry-After"].isdigit() and 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.headers["RateLimit-Policy"] == '"rate";q=3;w=60'
    openai = post(url, RATED, {"model": "acme/tiny", "prompt": "x", "max_tokens": 1}, path="/v1/completions")
    assert openai.status_code == 429 and openai.headers["x-ratelimit-remaining-requests"] == "0"
    assert openai.headers["x-ratelimit-limit-requests"] == "3" and openai.headers["x-ratelimit-reset-requests"].endswith("s")
    assert post(url, FREE).status_code == 202  # another key is not slowed down


def test_a_key_at_its_jobs_in_flight_gets_429_until_one_ends(hive):
    url, _ = hive
    auth = {"Authorization": f"Bearer {TEAM_B}"}
    first, second = post(url, TEAM_B), post(url, TEAM_B)
    assert first.status_code == second.status_code == 202
    assert second.headers["RateLimit"] == '"inflight";r=0'
    refused = post(url, TEAM_B)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "CONCURRENCY_LIMIT"
    assert refused.headers["Retry-After"] == "1" and refused.headers["RateLimit-Policy"] == '"inflight";q=2'
    assert post(url, FREE).status_code == 202
    assert httpx.delete(f"{url}/v1/inference/{first.json()['job_id']}", headers=auth, timeout=10).status_code == 200
    assert post(url, TEAM_B).status_code == 202
