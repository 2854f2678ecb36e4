"""Soak: thousands of jobs with random cancels, late followers and reconnects, on
many models, with one worker killed with SIGKILL and another paused with SIGSTOP
past its lease during the run. Reports lost and duplicate events, stuck jobs, Redis
keys left after the TTLs, and memory growth.

    python -m bench.soak                      # 2,000 jobs; writes a section of docs/benchmarks.md
    python -m bench.soak --jobs 200 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from bench.doc import replace_section
from shared import events, keys
from tests import processes
from tests.tiny_models import build_model

TTL_S = 15
#: Distinct models the jobs spread over: the workers end up holding most of them
#: (the default keep-alive), past the 47 at which a worker's pool used to run out.
MODELS = 60
#: How long the paused worker stays stopped: past its lease (keys.LEASE_S).
PAUSE_S = keys.LEASE_S + 4
STREAM_TIMEOUT_S = 60
JOB_TIMEOUT_S = 120


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def read_stream(client: httpx.AsyncClient, sse_url: str, last_id: str | None = None, stop_after: int | None = None):
    """(events as (id, type, data), whether [DONE] was reached)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    got: list[tuple[str, str, str]] = []
    async with aconnect_sse(client, "GET", sse_url, headers=headers) as source:
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            if sse.data == "[DONE]":
                return got, True
            got.append((sse.id, sse.event, sse.data))
            if stop_after is not None and len(got) >= stop_after:
                return got, False
    return got, False


async def one_job(client: httpx.AsyncClient, rng: random.Random, stats: Counter, connection: aioredis.Redis) -> None:
    model = f"soak/m{rng.randrange(MODELS):02d}"
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": rng.randint(4, 12), "temperature": 0.8}
    job = (await client.post("/v1/inference", json=body)).json()
    scenario = rng.choices(["plain", "cancel", "late", "reconnect", "two"], weights=[45, 10, 20, 20, 5])[0]
    stats[scenario] += 1
    sse_url = job["sse_url"]

    async def follow_whole() -> list:
        got, done = await read_stream(client, sse_url)
        stats["ended" if done else "unended"] += 1
        return got

    streams = []
    if scenario == "plain":
        streams.append(await follow_whole())
    elif scenario == "cancel":
        first, _ = await read_stream(client, sse_url, stop_after=rng.randint(1, 6))
        await client.delete(job["status_url"])
        rest, done = await read_stream(client, sse_url, last_id=first[-1][0] if first else None)
        stats["ended" if done else "unended"] += 1
        streams.append(first + rest)
    elif scenario == "late":
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        streams.append(await follow_whole())
    elif scenario == "reconnect":
        got, done = await read_stream(client, sse_url, stop_after=rng.randint(1, 8))
        while not done:  # reconnect (possibly several times) after the last id seen
            more, done = await read_stream(client, sse_url, last_id=got[-1][0], stop_after=rng.choice([None, 3]))
            got += more
        stats["ended"] += 1
        streams.append(got)
    else:
        streams += await asyncio.gather(follow_whole(), follow_whole())
    await check_streams(connection, job["job_id"], streams, stats)


async def run_jobs(url: str, redis_url: str, jobs: int, concurrency: int, seed: int, on_progress) -> Counter:
    rng = random.Random(seed)
    stats: Counter = Counter()
    connection = aioredis.Redis.from_url(redis_url)
    gate = asyncio.Semaphore(concurrency)
    done = 0
    limits = httpx.Limits(max_connections=concurrency * 3, max_keepalive_connections=concurrency * 3)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=STREAM_TIMEOUT_S), limits=limits) as client:

        async def guarded(i: int) -> None:
            nonlocal done
            async with gate:
                try:
                    # Bounded: a job that never ends is a finding, not a hang of the soak.
                    await asyncio.wait_for(one_job(client, random.Random(rng.random()), stats, connection), JOB_TIMEOUT_S)
                except Exception as e:  # a failed job is a finding, counted, not a crash
                    stats[f"client error: {type(e).__name__}"] += 1
                done += 1
                on_progress(done)

        await asyncio.gather(*(guarded(i) for i in range(jobs)))
    await connection.aclose()
    return stats


async def check_streams(connection: aioredis.Redis, job_id: str, streams: list, result: Counter) -> None:
    """Each follower's events against the job's replay log read from Redis itself,
    as soon as the job's streams are over (before its TTL runs out)."""
    entries = await connection.xrange(keys.job_events(job_id))
    log = [
        (str(seq), type_, data)
        for e, f in entries
        for seq, type_, data in events.log_events(e, f[b"e"].decode(), f[b"d"].decode())
    ]
    for got in streams:
        ids = [g[0] for g in got]
        result["duplicate events"] += len(ids) - len(set(ids))
        result["lost events"] += len({entry[0] for entry in log} - set(ids))
        result["mismatched events"] += sum(1 for g in got if g not in log)
        result["events delivered"] += len(got)
    result["jobs ending with " + (log[-1][1] if log else "nothing")] += 1
    if log and log[-1][1] == "error":
        result["  error " + json.loads(log[-1][2])["code"]] += 1
    state = await connection.hget(keys.job(job_id), "state")
    result["jobs stuck unfinished"] += state not in (b"completed", b"failed", b"cancelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hive-soak-") as tmp:
        tmp_path = Path(tmp)
        logs = tmp_path / "logs"
        logs.mkdir()
        tiny = build_model(tmp_path / "hub" / "soak" / "m00")
        for k in range(1, MODELS):
            shutil.copytree(tiny, tmp_path / "hub" / "soak" / f"m{k:02d}")
        redis_proc, redis_url = processes.start_redis(logs)
        hub_proc, hub_url = processes.start_hub(tmp_path / "hub", logs)
        port = processes.free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"HIVE_JOB_TTL_S": str(TTL_S), "HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf")}
        hive = processes.start("hive", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--log-level", "warning"), logs, env)
        workers = [
            processes.start(
                f"worker-{n}",
                processes.hive_command("worker", "--redis-url", redis_url, "--device", "cpu", "--token-delay-ms", "5", "--log-level", "warning"),
                logs,
                env,
            )
            for n in range(3)
        ]
        connection = redis.Redis.from_url(redis_url)
        try:
            processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 3, 120, "hive and workers", (hive, *workers))
            # Warm both workers so memory is measured from a steady state.
            with httpx.Client(base_url=url, timeout=60) as c:
                for _ in range(4):
                    job = c.post("/v1/inference", json={"model": "soak/m00", "prompt": "x", "max_tokens": 2}).json()
                    with c.stream("GET", job["sse_url"]) as r:
                        for _ in r.iter_lines():
                            pass
            rss_before = {p.name: rss_mb(p.process.pid) for p in (hive, *workers)}
            killed = {"at": None}
            paused = {"at": None}

            def resume() -> None:
                os.kill(workers[2].process.pid, signal.SIGCONT)

            def on_progress(n: int) -> None:
                if killed["at"] is None and n >= args.jobs // 3:
                    os.kill(workers[1].process.pid, signal.SIGKILL)
                    killed["at"] = n
                if paused["at"] is None and n >= args.jobs // 2:
                    os.kill(workers[2].process.pid, signal.SIGSTOP)
                    threading.Timer(PAUSE_S, resume).start()
                    paused["at"] = n
                if n % 200 == 0:
                    print(f"{n} jobs done", file=sys.stderr)

            start = time.monotonic()
            stats = asyncio.run(run_jobs(url, redis_url, args.jobs, args.concurrency, args.seed, on_progress))
            elapsed = time.monotonic() - start
            rss_after = {p.name: rss_mb(p.process.pid) for p in (hive, workers[0], workers[2])}
            held = {w["id"]: len(w["models"]) for w in httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"]}
            paused_log = workers[2].log()
            paused_alive = workers[2].process.poll() is None
            # Wait out the TTLs, then count what is left.
            deadline = time.monotonic() + TTL_S + 30
            while time.monotonic() < deadline and any(connection.scan_iter("hive:job:*", count=1000)):
                time.sleep(1)
            # The surviving worker's presence (its heartbeat hash, the queue's worker
            # set) is alive, not left over: it expires WORKER_DEAD_AFTER_S after the worker.
            # Its claims counter too: it expires CLAIM_TTL_MS after the last job routed to it.
            live = [n.decode() for n in connection.zrange(keys.workers(keys.DEFAULT_QUEUE), 0, -1)]
            presence = {keys.workers(keys.DEFAULT_QUEUE)} | {keys.worker(n) for n in live} | {keys.worker_claims(n) for n in live}
            hive_keys = sorted(k for k in (k.decode() for k in connection.scan_iter("hive:*")) if k not in presence)
            live_presence = sorted(presence & {k.decode() for k in connection.scan_iter("hive:*")})
            rq_jobs = sum(1 for _ in connection.scan_iter("rq:job:*"))
        finally:
            for proc in (*workers, hive, hub_proc, redis_proc):
                proc.stop()

    report = {
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 1),
        "jobs per second": round(args.jobs / elapsed, 1),
        "worker killed after job": killed["at"],
        f"worker paused with SIGSTOP for {PAUSE_S:g} s after job": paused["at"],
        "paused worker still running afterwards": paused_alive,
        "paused worker's lines: jobs given up, ends too late, wedged": [
            paused_log.count("abandoned, its lease was taken over"), paused_log.count("came too late"), paused_log.count("worker wedged"),
        ],
        "models held per live worker at the end": held,
        "scenarios and checks": dict(sorted(stats.items())),
        "hive keys left after TTLs": hive_keys,
        "live worker presence keys (not counted: they expire with the worker)": live_presence,
        "rq:job keys left (RQ's own, e.g. the killed worker's job)": rq_jobs,
        "RSS MB before": {k: round(v, 1) for k, v in rss_before.items()},
        "RSS MB after": {k: round(v, 1) for k, v in rss_after.items()},
    }
    print(json.dumps(report, indent=1))
    if not args.no_write:
        replace_section("Soak", f"""
## Soak: lost, duplicate and stuck events under cancels, reconnects, a killed worker and a paused one

Command: `python -m bench.soak --jobs {args.jobs} --concurrency {args.concurrency} --seed {args.seed}`.
A real redis-server, hub endpoint, `hive serve` and three `hive worker`s (tiny models, 5 ms a token,
job TTL {TTL_S} s, the default keep-alive); each job asks for one of {MODELS} distinct models, so
the workers hold dozens each. {args.concurrency} jobs in flight, each with a random scenario: a
plain follower, a cancel after 1–6 events (then resumed with Last-Event-ID), a late follower
(0.2–2 s after submit), disconnects and reconnects with Last-Event-ID, or two concurrent
followers. One worker is killed with SIGKILL after a third of the jobs; another is paused with
SIGSTOP after half of them, for {PAUSE_S:g} s (past its {keys.LEASE_S:g} s lease), then resumed.
Every follower's events are then compared with the job's replay log read from Redis.

```json
{json.dumps(report, indent=1)}
```
""")


if __name__ == "__main__":
    main()
