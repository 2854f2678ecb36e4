"""Cancellation in every phase, through the API, with real processes."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse

from tests import processes
from tests.sse import events, follow, status, submit

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


def cancel(base_url: str, job_id: str) -> httpx.Response:
    return httpx.delete(f"{base_url}/v1/inference/{job_id}", timeout=10)


def test_cancel_a_queued_job_ends_its_stream_at_once(idle_hive, redis_client):
    url, queue = idle_hive
    job = submit(url, model="acme/tiny", prompt=PROMPT)
    response = cancel(url, job["job_id"])
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    received = follow(url, job["sse_url"])
    assert [r.event for r in events(received)] == ["queued", "error"]
    assert events(received)[-1].json()["code"] == "CANCELLED" and received[-1].done
    final = status(url, job["job_id"])
    assert final["state"] == "cancelled" and final["error"]["code"] == "CANCELLED"
    assert job["job_id"] not in redis_client.lrange(f"rq:queue:{queue}", 0, -1)
    assert not redis_client.exists(f"rq:job:{job['job_id']}")


def stream_and_cancel(url: str, job: dict, cancel_when) -> tuple[list[tuple[str, str, float]], float]:
    """Follows the job to [DONE]; cancels it (expecting 202) the first time
    ``cancel_when(received)`` holds. Returns the events with their receipt times."""
    received, cancelled_at = [], 0.0
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{url}{job['sse_url']}") as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            received.append((sse.event, sse.data, time.monotonic()))
            if not cancelled_at and cancel_when(received):
                assert cancel(url, job["job_id"]).status_code == 202
                cancelled_at = time.monotonic()
            if sse.data == "[DONE]":
                break
    return received, cancelled_at


def test_cancel_while_generating_stops_within_a_token(slow_cluster):
    # 100 ms a token: 60 tokens would take 6 s.
    job = submit(slow_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=60, temperature=0)
    received, cancelled_at = stream_and_cancel(
        slow_cluster.url, job, lambda received: sum(1 for r in received if r[0] == "token") == 3
    )
    tokens_after = [r for r in received if r[0] == "token" and r[2] > cancelled_at]
    assert len(tokens_after) <= 1
    end = next(r for r in received if r[0] == "end")
    assert '"stop_reason":"cancelled"' in end[1] and end[2] - cancelled_at < 0.5
    final = status(slow_cluster.url, job["job_id"])
    assert final["state"] == "cancelled" and final["tokens_out"] <= 5 and final["stop_reason"] == "cancelled"


def test_cancel_while_downloading_stops_the_download(cluster):
    # acme/big-cancel: 16 MB on an 8 MB/s link, so the cancel lands mid-download.
    job = submit(cluster.url, model="acme/big-cancel", prompt=PROMPT, max_tokens=4)
    received, cancelled_at = stream_and_cancel(
        cluster.url, job, lambda received: received[-1][0] == "download" and '"bytes_downloaded":0,' not in received[-1][1]
    )
    kinds = [r[0] for r in received]
    assert "loading" not in kinds and "token" not in kinds
    error = next(r for r in received if r[0] == "error")
    assert '"code":"CANCELLED"' in error[1] and error[2] - cancelled_at < 1.0
    assert status(cluster.url, job["job_id"])["state"] == "cancelled"


def test_cancel_while_loading_stops_between_layers(cluster):
    # acme/deep has 200 decoder layers: the cancel lands while they are placed.
    job = submit(cluster.url, model="acme/deep", prompt=PROMPT, max_tokens=4)
    received, cancelled_at = stream_and_cancel(cluster.url, job, lambda received: received[-1][0] == "loading")
    kinds = [r[0] for r in received]
    assert "ready" not in kinds and "token" not in kinds
    layers = [json.loads(r[1]) for r in received if r[0] == "loading"]
    assert layers[-1]["layers_loaded"] < layers[-1]["layers_total"] == 200
    error = next(r for r in received if r[0] == "error")
    assert '"code":"CANCELLED"' in error[1] and error[2] - cancelled_at < 1.0
    assert status(cluster.url, job["job_id"])["state"] == "cancelled"


def test_cancelling_a_finished_job_is_a_harmless_409(cluster):
    job = submit(cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=2)
    follow(cluster.url, job["sse_url"])
    response = cancel(cluster.url, job["job_id"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "JOB_FINISHED"
    assert status(cluster.url, job["job_id"])["state"] == "completed"


def test_cancel_unknown_job_is_404(cluster):
    response = cancel(cluster.url, "0" * 32)
    assert response.status_code == 404 and response.json()["error"]["code"] == "JOB_NOT_FOUND"


def _read_then_hang_up(url: str, sse_url: str, tokens: int) -> None:
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{url}{sse_url}") as source:
        seen = 0
        for sse in source.iter_sse():
            seen += sse.event == "token"
            if seen == tokens:
                return  # closes the connection


def test_cancel_on_disconnect_cancels_when_the_last_follower_leaves(slow_cluster):
    job = submit(slow_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=60, temperature=0, cancel_on_disconnect=True)
    _read_then_hang_up(slow_cluster.url, job["sse_url"], 2)
    processes.wait_until(lambda: status(slow_cluster.url, job["job_id"])["state"] == "cancelled", 5, "cancellation")
    assert status(slow_cluster.url, job["job_id"])["tokens_out"] < 60


def test_without_cancel_on_disconnect_a_job_outlives_its_follower(slow_cluster):
    job = submit(slow_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    _read_then_hang_up(slow_cluster.url, job["sse_url"], 2)
    processes.wait_until(lambda: status(slow_cluster.url, job["job_id"])["state"] == "completed", 10, "completion")
    assert status(slow_cluster.url, job["job_id"])["tokens_out"] == 8
