"""The fleet benchmark's stream: jobs for two models arriving as a Poisson stream on
two workers, and the analysis of who waited while a worker was idle."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse, connect_sse

from bench.fleet_cluster import (
    IDLE_WAIT_THRESHOLD_S,
    PROMPT,
    STREAM_MODELS,
    WORKERS,
    Cluster,
)
from shared import job_record, keys


@dataclass
class StreamJob:
    index: int
    model: str
    job_id: str = ""
    #: Where the hive put it: a worker's own queue (warm routing) or the shared one.
    routed_to: str = ""
    warm: bool | None = None
    client_ttft_ms: float = 0.0
    status: dict = field(default_factory=dict)
    error: str = ""

    @property
    def created(self) -> float:
        return self.status["created_at"]

    @property
    def picked(self) -> float:
        return self.status["picked_at"]

    @property
    def started(self) -> float:
        return self.status["started_at"]

    @property
    def finished(self) -> float:
        return self.status["finished_at"]

    @property
    def worker(self) -> str:
        return self.status["worker"]

    @property
    def attempt(self) -> int:
        return self.status.get("attempt") or 1

    @property
    def complete(self) -> bool:
        return not self.error and all(self.status.get(k) for k in ("created_at", "picked_at", "started_at", "finished_at"))


def follow_all(client: httpx.Client, sse_urls: list[str]) -> None:
    for sse_url in sse_urls:
        with connect_sse(client, "GET", sse_url) as source:
            for sse in source.iter_sse():
                if sse.data == "[DONE]":
                    break


def load_both_models_on_both_workers(cluster: Cluster, max_tokens: int) -> None:
    """Two concurrent jobs for a model that no idle worker holds go to the shared
    queue, and each worker takes one: then both hold it."""
    with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(30, read=300)) as client:
        for _ in range(5):
            held = cluster.models_held()
            missing = [m for m in STREAM_MODELS if not all(m in models for models in held.values())]
            if not missing:
                return
            for model in missing:
                body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
                follow_all(client, [client.post("/v1/inference", json=body).json()["sse_url"] for _ in WORKERS])
    raise RuntimeError(f"could not load both stream models on both workers: {cluster.models_held()}")


def service_time_s(cluster: Cluster, max_tokens: int, jobs: int = 6) -> float:
    """Median picked → finished of a warm job, one at a time."""
    times = []
    with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(30, read=300)) as client:
        for i in range(jobs):
            body = {"model": list(STREAM_MODELS)[i % 2], "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
            job = client.post("/v1/inference", json=body).json()
            follow_all(client, [job["sse_url"]])
            status = client.get(job["status_url"]).json()
            times.append(status["finished_at"] - status["picked_at"])
    return statistics.median(times)


async def run_stream(cluster: Cluster, rate_per_s: float, count: int, max_tokens: int, seed: int) -> list[StreamJob]:
    rng = random.Random(seed)
    at, offsets = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate_per_s)
        offsets.append(at)
    stream = [StreamJob(i, rng.choice(list(STREAM_MODELS))) for i in range(count)]
    own_prefix = keys.worker_queue(cluster.queue, "")
    connection = aioredis.Redis.from_url(cluster.redis_url)
    limits = httpx.Limits(max_connections=count * 2 + 10, max_keepalive_connections=count * 2 + 10)
    loop = asyncio.get_running_loop()
    begin = loop.time() + 0.2

    async def one(client: httpx.AsyncClient, job: StreamJob) -> None:
        await asyncio.sleep(max(0.0, begin + offsets[job.index] - loop.time()))
        body = {"model": job.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        try:
            start = time.perf_counter()
            submitted = (await client.post("/v1/inference", json=body)).json()
            job.job_id = submitted["job_id"]
            routed = (await connection.hget(keys.job(job.job_id), job_record.RQ_QUEUE) or b"").decode()
            job.routed_to = routed.removeprefix(own_prefix) if routed.startswith(own_prefix) else "shared"
            async with aconnect_sse(client, "GET", submitted["sse_url"]) as source:
                async for sse in source.aiter_sse():
                    if sse.data == "[DONE]":
                        break
                    if sse.event == "ready":
                        job.warm = json.loads(sse.data)["warm"]
                    elif sse.event == "token" and not job.client_ttft_ms:
                        job.client_ttft_ms = (time.perf_counter() - start) * 1000
                    elif sse.event == "error":
                        job.error = sse.data
            job.status = (await client.get(submitted["status_url"])).json()
        except (httpx.HTTPError, KeyError, ValueError) as e:  # a failed job is a finding, reported, not a crash
            job.error = f"client: {type(e).__name__}: {e}"

    async with httpx.AsyncClient(base_url=cluster.url, timeout=httpx.Timeout(30, read=300), limits=limits) as client:
        await asyncio.gather(*(one(client, job) for job in stream))
    await connection.aclose()
    return stream


def overlap(a: float, b: float, spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of [a, b] inside ``spans``."""
    return [(max(a, x), min(b, y)) for x, y in spans if min(b, y) > max(a, x)]


def worker_gaps(stream: list[StreamJob], workers: list[str]) -> tuple[dict[str, list[tuple[float, float]]], list[float]]:
    """Per worker, the spans in which it was idle, and every worker's turnarounds (ms).

    Between two of its jobs a worker either turns around (when it finished the last
    one, a job was waiting where it looks, on the shared queue or its own: RQ's
    bookkeeping and the pickup follow, however long they take) or is idle (nothing
    it looks at was waiting). It is idle before its first job and after its last."""
    done = [j for j in stream if j.complete]
    idle, turnarounds = {}, []
    for worker in workers:
        spans, free_since = [], float("-inf")
        for job in sorted((j for j in done if j.worker == worker), key=lambda j: j.picked):
            if job.picked > free_since:
                if any(j.created < free_since < j.picked and j.routed_to in ("shared", worker) for j in done):
                    turnarounds.append((job.picked - free_since) * 1000)
                else:
                    spans.append((free_since, job.picked))
            free_since = max(free_since, job.finished)
        spans.append((free_since, float("inf")))
        idle[worker] = spans
    return idle, turnarounds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def dist(values: list[float]) -> str:
    """median (p90, max), in ms."""
    if not values:
        return "–"
    return f"{statistics.median(values):.0f} (p90 {percentile(values, 0.9):.0f}, max {max(values):.0f})"


def analyse(stream: list[StreamJob], workers: list[str], load: float, rate: float) -> dict:
    done = [j for j in stream if j.complete]
    spans, turnaround = worker_gaps(stream, workers)
    idle_waits, waited = [], []
    for job in done:
        by_worker = {w: overlap(job.created, job.picked, spans[w]) for w in workers}
        # Time in which at least one worker was idle (the union of their idle parts).
        idle_s, last = 0.0, float("-inf")
        for a, b in sorted(part for parts in by_worker.values() for part in parts):
            idle_s += max(0.0, b - max(a, last))
            last = max(last, b)
        idle_waits.append(idle_s * 1000)
        if idle_s > IDLE_WAIT_THRESHOLD_S:
            waited.append((idle_s, job, by_worker))
    begin = min(j.created for j in done)
    span_s = max(j.created for j in done) - begin
    return {
        "load": load,
        "rate": rate,
        "offered": (len(done) - 1) / span_s if span_s > 0 else 0.0,
        "jobs": len(stream),
        "failed": [(j.index, j.job_id, j.error or j.status.get("state")) for j in stream if not j.complete],
        "retried": [(j.index, j.job_id) for j in stream if j.attempt > 1],
        "service_ms": [(j.finished - j.picked) * 1000 for j in done],
        "queue_ms": [(j.picked - j.created) * 1000 for j in done],
        "to_started_ms": [(j.started - j.created) * 1000 for j in done],
        "client_ttft_ms": [j.client_ttft_ms for j in done],
        "warm": sum(1 for j in done if j.warm),
        "done": len(done),
        "per_worker": {w: sum(1 for j in done if j.worker == w) for w in workers},
        "routed_own": sum(1 for j in done if j.routed_to != "shared"),
        "handed_on": sum(1 for j in done if j.routed_to not in ("shared", j.worker)),
        # Routed to an idle holder's own queue, and picked before jobs that waited longer on the shared queue.
        "overtook": sum(
            1 for j in done if j.routed_to != "shared" and any(k.routed_to == "shared" and k.created < j.created and k.picked > j.picked for k in done)
        ),
        "idle_wait_ms": idle_waits,
        "waited": [
            {
                "job": j.job_id[:8],
                "index": j.index,
                "model": j.model,
                "routed_to": j.routed_to,
                "ran_on": j.worker,
                "warm": j.warm,
                "created_s": round(j.created - begin, 3),
                "picked_s": round(j.picked - begin, 3),
                "started_s": round(j.started - begin, 3),
                "finished_s": round(j.finished - begin, 3),
                "queue_ms": round((j.picked - j.created) * 1000, 1),
                "idle_wait_ms": round(idle_s * 1000, 1),
                "idle_while_waiting_s": {w: [[round(a - begin, 3), round(b - begin, 3)] for a, b in parts] for w, parts in by_worker.items() if parts},
            }
            for idle_s, j, by_worker in sorted(waited, key=lambda x: -x[0])
        ],
        "turnaround_ms": turnaround,
        "timeline": [
            (j.index, j.job_id[:8], j.model.rsplit("-", 1)[-1], j.routed_to, j.worker, round(j.created - begin, 3), round(j.picked - begin, 3), round(j.finished - begin, 3))
            for j in sorted(done, key=lambda j: j.created)
        ],
    }


