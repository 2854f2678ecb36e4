"""Resuming a stream with Last-Event-ID: follow a job, hang up after its third event,
reconnect, and get exactly the events after it.

A job runs on when its followers leave (unless submitted with `cancel_on_disconnect`),
and the hive keeps its replay log, so a client can come back at any time within the job
TTL (24 h), to this hive or another. Prints one line per event: its id and type.
Reads HIVE_URL (default http://127.0.0.1:7833), HIVE_MODEL (default hive-demo/tiny-llama)
and HIVE_API_KEY (only for a hive with API keys).
"""

from __future__ import annotations

import os
import sys

import httpx
from httpx_sse import connect_sse

HIVE_URL = os.environ.get("HIVE_URL", "http://127.0.0.1:7833")
MODEL = os.environ.get("HIVE_MODEL", "hive-demo/tiny-llama")
API_KEY = os.environ.get("HIVE_API_KEY")


def follow(client: httpx.Client, sse_url: str, last_event_id: str | None, hang_up_after: int | None = None) -> str | None:
    """Prints the stream's events; returns the id of the last one, None once `[DONE]` came."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with connect_sse(client, "GET", sse_url, headers=headers) as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue  # a `: ping` comment, sent while nothing happens
            if sse.data == "[DONE]":
                print("[DONE]")
                return None
            print(f"{sse.id} {sse.event}")
            last_event_id = sse.id
            if hang_up_after is not None and int(sse.id) >= hang_up_after:
                return last_event_id  # leaving the `with` closes the connection
    return last_event_id


def main() -> int:
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    with httpx.Client(base_url=HIVE_URL, headers=headers, timeout=httpx.Timeout(10, read=60)) as client:
        response = client.post("/v1/inference", json={"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16})
        response.raise_for_status()
        sse_url = response.json()["sse_url"]

        last = follow(client, sse_url, None, hang_up_after=3)
        print(f"-- hung up after event {last}; reconnecting with Last-Event-ID: {last}", file=sys.stderr)
        # What a browser's EventSource sends by itself; `?last_event_id=` in the URL does the same.
        while last is not None:
            last = follow(client, sse_url, last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
