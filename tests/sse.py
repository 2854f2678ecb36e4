"""A test client for the API: submit jobs and read SSE streams with a real SSE parser."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
from httpx_sse import connect_sse


@dataclass(frozen=True)
class Received:
    id: str
    event: str
    data: str
    at: float  # time.monotonic() at receipt

    def json(self) -> dict:
        return json.loads(self.data)

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"


def submit(base_url: str, **body) -> dict:
    response = httpx.post(f"{base_url}/v1/inference", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


class Unavailable(Exception):
    """The hive answered 503 with Retry-After (Redis unavailable): a client retries."""


def follow(base_url: str, sse_url: str, last_event_id: str | None = None, limit: int | None = None, timeout: float = 60,
           into: list[Received] | None = None) -> list[Received]:
    """Reads the stream until ``[DONE]`` (included) or until ``limit`` events were read;
    ``into``: the list they are appended to, which keeps them if the connection breaks."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    received: list[Received] = [] if into is None else into
    with httpx.Client(timeout=httpx.Timeout(10, read=timeout)) as client:
        with connect_sse(client, "GET", f"{base_url}{sse_url}", headers=headers) as source:
            if source.response.status_code == 503 and "Retry-After" in source.response.headers:
                raise Unavailable(source.response.read().decode())
            assert source.response.status_code == 200, (source.response.status_code, source.response.read())
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for sse in source.iter_sse():
                if not sse.data:
                    continue  # a keep-alive comment: EventSource dispatches nothing for it
                received.append(Received(sse.id, sse.event, sse.data, time.monotonic()))
                if sse.data == "[DONE]" or (limit is not None and len(received) >= limit):
                    break
    return received


def events(received: list[Received]) -> list[Received]:
    """The job events, without the final [DONE]."""
    return [r for r in received if not r.done]


def run_job(base_url: str, **body) -> tuple[dict, list[Received]]:
    job = submit(base_url, **body)
    return job, follow(base_url, job["sse_url"])


def status(base_url: str, job_id: str) -> dict:
    response = httpx.get(f"{base_url}/v1/inference/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def lost_events(received: list[Received]) -> int:
    """Checks what a follower must see when Redis lost events (a failover, a restart):
    ids that only grow, each event right after the one before, or after a ``gap``
    event that names exactly the ids skipped. Returns how many events gaps skipped."""
    lost, expected = 0, 1
    for event in received:
        if event.done:
            break
        if not event.id or int(event.id) < expected:  # an id-less terminal event comes last
            assert event.event in ("end", "error") and event is received[-2], f"event {event} goes backwards"
            continue
        if event.event == "gap":
            gap = event.json()
            assert (gap["first"], gap["last"]) == (expected, int(event.id)), f"gap {gap} after event {expected - 1}"
            lost += gap["last"] - gap["first"] + 1
        else:
            assert int(event.id) == expected, f"event {event.id} after {expected - 1}, with no gap event"
        expected = int(event.id) + 1
    return lost
