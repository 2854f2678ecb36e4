"""The HTTP contract around the stream: bad input, unknown jobs, keep-alives, health.

Runs against a real ``hive serve`` on a queue no worker serves, so a job stays
queued and the queue length shows exactly what was enqueued.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests import processes
from tests.sse import follow, submit

pytestmark = pytest.mark.e2e

GOOD = {"model": "acme/tiny", "prompt": "hi"}


def queue_length(redis_client, queue: str) -> int:
    return redis_client.llen(f"rq:queue:{queue}")


def job_keys(redis_client) -> set[str]:
    return set(redis_client.scan_iter("hive:job:*"))


BAD_BODIES = [
    ("not json", b"{model: tiny", 400, "INVALID_JSON"),
    ("empty body", b"", 400, "INVALID_JSON"),
    ("invalid utf-8", b'{"model": "\xff\xfe"}', 400, "INVALID_JSON"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400, "INVALID_JSON"),
    ("lone surrogate", b'{"model": "acme/tiny", "prompt": "\\ud800"}', 422, "INVALID_REQUEST"),
    ("NaN temperature", b'{"model": "acme/tiny", "prompt": "hi", "temperature": NaN}', 422, "INVALID_REQUEST"),
    ("a list", b"[1, 2]", 422, "INVALID_REQUEST"),
    ("a string", b'"prompt"', 422, "INVALID_REQUEST"),
    ("no model", {"prompt": "hi"}, 422, "INVALID_REQUEST"),
    ("model not org/name", {"model": "tiny", "prompt": "hi"}, 422, "INVALID_REQUEST"),
    ("model path trick", {"model": "../../etc/passwd", "prompt": "hi"}, 422, "INVALID_REQUEST"),
    ("model dot-dot", {"model": "acme/..", "prompt": "hi"}, 422, "INVALID_REQUEST"),
    ("model wrong type", {"model": 7, "prompt": "hi"}, 422, "INVALID_REQUEST"),
    ("neither prompt nor messages", {"model": "acme/tiny"}, 422, "INVALID_REQUEST"),
    ("both prompt and messages", {**GOOD, "messages": [{"role": "user", "content": "x"}]}, 422, "INVALID_REQUEST"),
    ("prompt wrong type", {"model": "acme/tiny", "prompt": 5}, 422, "INVALID_REQUEST"),
    ("messages empty", {"model": "acme/tiny", "messages": []}, 422, "INVALID_REQUEST"),
    ("message bad role", {"model": "acme/tiny", "messages": [{"role": "wizard", "content": "x"}]}, 422, "INVALID_REQUEST"),
    ("message extra field", {"model": "acme/tiny", "messages": [{"role": "user", "content": "x", "x": 1}]}, 422, "INVALID_REQUEST"),
    ("unknown field", {**GOOD, "max_new_tokens": 5}, 422, "INVALID_REQUEST"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, 422, "INVALID_REQUEST"),
    ("max_tokens too big", {**GOOD, "max_tokens": 4097}, 422, "INVALID_REQUEST"),
    ("max_tokens as string", {**GOOD, "max_tokens": "5"}, 422, "INVALID_REQUEST"),
    ("max_tokens as float", {**GOOD, "max_tokens": 5.5}, 422, "INVALID_REQUEST"),
    ("max_tokens huge number", {**GOOD, "max_tokens": 10**40}, 422, "INVALID_REQUEST"),
    ("max_tokens bool", {**GOOD, "max_tokens": True}, 422, "INVALID_REQUEST"),
    ("temperature negative", {**GOOD, "temperature": -0.1}, 422, "INVALID_REQUEST"),
    ("temperature string", {**GOOD, "temperature": "hot"}, 422, "INVALID_REQUEST"),
    ("top_p zero", {**GOOD, "top_p": 0}, 422, "INVALID_REQUEST"),
    ("top_p above one", {**GOOD, "top_p": 1.5}, 422, "INVALID_REQUEST"),
    ("top_k negative", {**GOOD, "top_k": -1}, 422, "INVALID_REQUEST"),
    ("seed negative", {**GOOD, "seed": -1}, 422, "INVALID_REQUEST"),
    ("stop not a list", {**GOOD, "stop": "\n"}, 422, "INVALID_REQUEST"),
    ("stop empty string", {**GOOD, "stop": [""]}, 422, "INVALID_REQUEST"),
    ("revision path trick", {**GOOD, "revision": "../main"}, 422, "INVALID_REQUEST"),
    ("null prompt and no messages", {"model": "acme/tiny", "prompt": None}, 422, "INVALID_REQUEST"),
    ("keep_alive an object", {**GOOD, "keep_alive": {"m": 5}}, 422, "INVALID_REQUEST"),
    ("keep_alive a list", {**GOOD, "keep_alive": ["5m"]}, 422, "INVALID_REQUEST"),
    ("keep_alive not a duration", {**GOOD, "keep_alive": "5 minutes"}, 422, "INVALID_REQUEST"),
    ("keep_alive beyond a week", {**GOOD, "keep_alive": "200h"}, 422, "INVALID_REQUEST"),
]


@pytest.mark.parametrize("name,body,status,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_clear_4xx_and_enqueues_nothing(idle_hive, redis_client, name, body, status, code):
    url, queue = idle_hive
    before_len, before_keys = queue_length(redis_client, queue), job_keys(redis_client)
    if isinstance(body, bytes):
        response = httpx.post(f"{url}/v1/inference", content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{url}/v1/inference", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    assert queue_length(redis_client, queue) == before_len
    assert job_keys(redis_client) == before_keys


def test_oversized_body_is_413_without_reading_it_all(idle_hive, redis_client):
    url, queue = idle_hive
    before = queue_length(redis_client, queue)
    big = {**GOOD, "prompt": "x" * (2 * 1024 * 1024)}
    response = httpx.post(f"{url}/v1/inference", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "BODY_TOO_LARGE"
    # Chunked upload without Content-Length: refused while streaming.
    chunks = iter([b'{"model": "acme/tiny", "prompt": "', b"y" * (2 * 1024 * 1024), b'"}'])
    response = httpx.post(f"{url}/v1/inference", content=chunks)
    assert response.status_code == 413
    assert queue_length(redis_client, queue) == before


def test_message_names_the_bad_field(idle_hive):
    url, _ = idle_hive
    response = httpx.post(f"{url}/v1/inference", json={**GOOD, "max_tokens": 5000})
    error = response.json()["error"]
    assert "max_tokens" in error["message"]
    assert error["details"][0]["field"] == "max_tokens"


@pytest.mark.parametrize("path", ["/v1/inference/{id}", "/v1/inference/{id}/stream"])
@pytest.mark.parametrize(
    "job_id", ["0123456789abcdef0123456789abcdef", "nope", "..%2F..%2Fetc", "%00", "A" * 300]
)
def test_unknown_job_is_404_json(idle_hive, path, job_id):
    url, _ = idle_hive
    response = httpx.get(url + path.format(id=job_id))
    assert response.status_code == 404
    assert response.json()["error"]["code"] in ("JOB_NOT_FOUND", "NOT_FOUND")


def test_queued_job_has_status_and_keepalive_comments(idle_hive, redis_client):
    url, queue = idle_hive
    job = submit(url, **GOOD)
    assert job["position"] == queue_length(redis_client, queue)
    status = httpx.get(f"{url}{job['status_url']}").json()
    assert status["state"] == "queued" and status["model"] == "acme/tiny" and status["worker"] is None
    lines = []
    with httpx.stream("GET", f"{url}{job['sse_url']}", timeout=10) as response:
        for line in response.iter_lines():
            lines.append(line)
            if sum(1 for x in lines if x.startswith(":")) == 2:
                break
    assert lines[:3] == ["id: 1", "event: queued", f'data: {{"event":"queued","position":{job["position"]}}}']
    assert sum(1 for x in lines if x.startswith(":")) == 2


def test_bad_last_event_id_is_400(idle_hive):
    url, _ = idle_hive
    job = submit(url, **GOOD)
    response = httpx.get(f"{url}{job['sse_url']}", headers={"Last-Event-ID": "abc"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_LAST_EVENT_ID"


def test_wrong_method_and_unknown_path_are_json(idle_hive):
    url, _ = idle_hive
    response = httpx.get(f"{url}/v1/inference")
    assert response.status_code == 405 and response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    response = httpx.get(f"{url}/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"


def test_health_reports_redis_and_workers(idle_hive):
    url, _ = idle_hive
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["redis"] == "ok" and health["workers"] == 0


def test_oversized_headers_are_a_clear_4xx_and_the_hive_stays_up(idle_hive):
    url, _ = idle_hive
    response = httpx.get(f"{url}/health", headers={"X-Padding": "a" * 32_000})
    assert response.status_code == 431 and response.json()["error"]["code"] == "HEADERS_TOO_LARGE"
    response = httpx.get(f"{url}/health", headers={f"X-Many-{i}": "v" * 40 for i in range(1000)})
    assert response.status_code == 431
    # Past what the server buffers it answers a bare 400 and closes, or resets the
    # connection while the client is still sending: never a 5xx, never a hang.
    try:
        response = httpx.post(f"{url}/v1/inference", headers={"X-Padding": "a" * 1_000_000}, json=GOOD)
        assert response.status_code == 400
    except httpx.TransportError:
        pass
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_flood_of_connections_that_never_read_does_not_starve_others(idle_hive, redis_client):
    """200 clients open a stream and never read it, 200 more connect and send
    nothing: the hive still answers at once, a reading follower gets its events,
    and every stream is released when its client goes."""
    url, queue = idle_hive
    job = httpx.post(f"{url}/v1/inference", json=GOOD).json()
    host, port = url.removeprefix("http://").split(":")
    request = f"GET {job['sse_url']} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    silent, streaming = [], []
    try:
        for _ in range(200):
            silent.append(socket.create_connection((host, int(port))))
            sock = socket.create_connection((host, int(port)))
            sock.sendall(request)
            streaming.append(sock)
        processes.wait_until(lambda: processes.health(url)["followers"] == 200, 20, "200 followers")

        started = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        other = httpx.post(f"{url}/v1/inference", json=GOOD, timeout=5)
        assert other.status_code == 202 and time.monotonic() - started < 2.0
        assert httpx.delete(f"{url}/v1/inference/{job['job_id']}").status_code == 200
        received = follow(url, job["sse_url"], timeout=10)
        assert [r.event for r in received] == ["queued", "error", "message"] and received[-1].done
        httpx.delete(f"{url}/v1/inference/{other.json()['job_id']}")
    finally:
        for sock in silent + streaming:
            sock.close()
    processes.wait_until(lambda: processes.health(url)["followers"] == 0, 20, "streams released")


def test_a_waiting_job_hears_its_position_move_up(idle_hive):
    url, _ = idle_hive
    jobs = [httpx.post(f"{url}/v1/inference", json=GOOD).json() for _ in range(3)]
    last = jobs[-1]
    try:
        position = last["position"]
        # The reaper tells it within a second or two of each change.
        assert httpx.delete(f"{url}/v1/inference/{jobs[0]['job_id']}").status_code == 200
        received = follow(url, last["sse_url"], limit=2, timeout=10)
        assert [(r.id, r.event, r.json()["position"]) for r in received] == [("1", "queued", position), ("2", "queued", position - 1)]
        assert httpx.delete(f"{url}/v1/inference/{jobs[1]['job_id']}").status_code == 200
        received = follow(url, last["sse_url"], last_event_id="2", limit=1, timeout=10)
        assert [(r.id, r.event, r.json()["position"]) for r in received] == [("3", "queued", position - 2)]
    finally:
        httpx.delete(f"{url}/v1/inference/{last['job_id']}")
