"""Submit a prompt to a hive and print its tokens as they arrive (httpx and httpx-sse).

Progress (download, loading) and the job's end go to stderr, the generated text to stdout.
Reads HIVE_URL (default http://127.0.0.1:7833), HIVE_MODEL (default hive-demo/tiny-llama)
and HIVE_API_KEY (only for a hive with API keys). Exits 0 when the job completed.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
from httpx_sse import connect_sse

HIVE_URL = os.environ.get("HIVE_URL", "http://127.0.0.1:7833")
MODEL = os.environ.get("HIVE_MODEL", "hive-demo/tiny-llama")
API_KEY = os.environ.get("HIVE_API_KEY")


def main() -> int:
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    # The hive sends a `: ping` comment every 10 s while nothing happens, so a 60 s read timeout holds.
    with httpx.Client(base_url=HIVE_URL, headers=headers, timeout=httpx.Timeout(10, read=60)) as client:
        response = client.post("/v1/inference", json={"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 32})
        response.raise_for_status()
        job = response.json()
        print(f"job {job['job_id']}, queued at position {job['position']}", file=sys.stderr)

        with connect_sse(client, "GET", job["sse_url"]) as source:
            for sse in source.iter_sse():
                if not sse.data:
                    continue  # a `: ping` comment, sent while nothing happens
                if sse.data == "[DONE]":
                    break
                event = json.loads(sse.data)
                if sse.event == "token":
                    print(event["t"], end="", flush=True)
                elif sse.event == "download":
                    print(f"download {event['bytes_downloaded']}/{event['bytes_total']} bytes", file=sys.stderr)
                elif sse.event == "loading":
                    print(f"loading layer {event['layers_loaded']}/{event['layers_total']}", file=sys.stderr)
                elif sse.event == "end":
                    print(f"\n{event['tokens_out']} tokens · first token {event['ttft_ms']:.0f} ms · stop: {event['stop_reason']}", file=sys.stderr)
                    return 0
                elif sse.event == "error":
                    # Without an id the stream ended, not the job: resume with Last-Event-ID
                    # (docs/examples/resume_stream.py).
                    print(f"\nerror {event['code']}: {event['message']}", file=sys.stderr)
                    return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
