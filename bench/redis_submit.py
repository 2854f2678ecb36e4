"""Redis's side of a submit: redis-server CPU per job submitted, and so the submits
per second one Redis core carries.

    python -m bench.redis_submit --rounds 3 --seconds 4 --concurrency 32

Real parts: a redis-server of its own on a free port (no persistence) and the
hive's own submit (``hive.jobs.submit.Submitter``: one Lua script writing the job's
record, its ``queued`` event, the jobs index, the waiting sets and RQ's job hash
and queue entry), called from this process without HTTP: ``--concurrency``
submits in flight on one asyncio loop, for ``--seconds`` a round, no worker (the
jobs queue; FLUSHALL between rounds). Per round: submits/s achieved, Redis
commands/s (INFO commandstats, the script's own commands counted inside it),
and redis-server's CPU (/proc/<pid>/stat). Submits/s at one full Redis core,
submits/s ÷ Redis's busy fraction, is an extrapolation; this process (Python:
pydantic, RQ's job hash) shares the machine's cores with redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from bench.figure import spread
from bench.proc import cpu_seconds
from hive.jobs.submit import Submitter
from shared.clock import RedisClock
from shared.settings import Settings
from shared.spec import InferenceRequest
from tests import processes

OWN = {"config|resetstat", "info", "flushall"}
REQUEST = InferenceRequest(model="bench/tiny", prompt="The quick brown fox jumps over the lazy dog.", max_tokens=16, temperature=0)


async def submit_for(settings: Settings, sync: redis.Redis, seconds: float, concurrency: int) -> int:
    connection = aioredis.Redis.from_url(settings.redis_url, max_connections=concurrency)
    clock = RedisClock(sync)
    clock.measure()
    submitter = Submitter(settings, connection, sync, clock)
    done = 0
    end = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await submitter.enqueue(REQUEST, owner="")
            done += 1

    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        await connection.aclose()
    return done


def one_round(settings: Settings, control: redis.Redis, redis_pid: int, seconds: float, concurrency: int) -> dict:
    control.flushall()
    control.config_resetstat()
    redis_cpu, own_cpu = cpu_seconds(redis_pid), time.process_time()
    start = time.perf_counter()
    submits = asyncio.run(submit_for(settings, control, seconds, concurrency))
    elapsed = time.perf_counter() - start
    redis_cpu, own_cpu = cpu_seconds(redis_pid) - redis_cpu, time.process_time() - own_cpu
    stats = control.info("commandstats")
    commands = sum(v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") not in OWN)
    return {
        "submits_per_s": submits / elapsed,
        "commands_per_submit": commands / submits,
        "redis_cores": redis_cpu / elapsed,
        "client_cores": own_cpu / elapsed,
        "redis_us_per_submit": redis_cpu / submits * 1e6,
        "ceiling_per_s": submits / redis_cpu,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32, help="submits in flight")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hive-bench-redis-submit-") as tmp:
        proc, url = processes.start_redis(Path(tmp))
        control = redis.Redis.from_url(url)
        settings = Settings(redis_url=url, max_queue=10**8, max_queue_per_model=10**8)
        try:
            one_round(settings, control, proc.process.pid, 1.0, args.concurrency)  # warm-up: the script cached
            runs = []
            for r in range(args.rounds):
                runs.append(one_round(settings, control, proc.process.pid, args.seconds, args.concurrency))
                print(f"round {r + 1}: {runs[-1]['submits_per_s']:,.0f} submits/s, redis {runs[-1]['redis_cores']:.2f} cores", file=sys.stderr)
        finally:
            control.close()
            proc.stop()
    col = lambda k, fmt: spread([r[k] for r in runs], fmt)  # noqa: E731
    print("| submits/s achieved | commands a submit (inside the script) | redis-server CPU (cores) | this process's CPU | Redis CPU a submit | **submits/s at 1 full Redis core (extrapolated)** |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {col('submits_per_s', ',.0f')} | {col('commands_per_submit', '.1f')} | {col('redis_cores', '.2f')} | {col('client_cores', '.2f')} "
          f"| {col('redis_us_per_submit', '.0f')} µs | **{col('ceiling_per_s', ',.0f')}** |")
    return runs


if __name__ == "__main__":
    main()
