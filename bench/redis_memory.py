"""Redis memory a finished job keeps for the job TTL: its replay log and its
record, before and after the compaction of its token events, and per day at a
stated load.

    python -m bench.redis_memory                            # jobs of 50, 250 and 1,000 tokens, 20 of each
    python -m bench.redis_memory --sizes 1000 --jobs 50

Real parts: a redis-server of its own on a free port (no persistence: memory
is the same either way), the hive's own submit script (``hive.jobs.submit.Submitter``:
the job record, its ``queued`` event, the jobs index and RQ's job hash), RQ's
own bookkeeping on success played by the benchmark (the queue entry popped and,
as ``result_ttl=0`` makes RQ do, its job hash deleted), then the worker's own
``JobReporter``: ``started``, the tokens through a ``StepWriter`` (all the jobs
of one size in one batch, one token each a step), and ``finish`` with the record
fields the worker writes (the output text among them); ``finish`` runs the
compaction (shared/events.py ``COMPACT_TOKENS``).

Per size: MEMORY USAGE (SAMPLES 0, exact) of each job's replay log and record
once its last token is in (before compaction) and after ``finish``, plus its
share of the jobs index: the job's bytes (medians over the jobs). As a check,
INFO used_memory before the submits, after the tokens and after the finishes,
per job (it also moves with client buffers and the allocator). Token texts are
short words with their leading space (" the", " quick"), as BPE pieces are.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
from rq import Queue

from bench.figure import spread
from hive.jobs.submit import Submitter
from shared import job_record, keys
from shared.clock import RedisClock
from shared.events import End, Started, Token
from shared.settings import Settings
from shared.spec import InferenceRequest, JobState
from tests import processes
from worker.cluster.reporter import JobReporter
from worker.engine.step_writer import StepWriter

PROMPT = "The quick brown fox jumps over the lazy dog."
WORDS = [" " + w for w in "the quick brown fox jumps over a lazy dog and then runs into the woods , where it".split()]
ISSUE_BYTES_PER_TOKEN = 68.7e3 / 1000  # issue 12's measurement, before compaction


def usage(connection: redis.Redis, key: str) -> int:
    return connection.memory_usage(key, samples=0) or 0


def used_memory(connection: redis.Redis) -> int:
    return connection.info("memory")["used_memory"]


async def submit_all(settings: Settings, sync: redis.Redis, count: int, max_tokens: int) -> list[str]:
    connection = aioredis.Redis.from_url(settings.redis_url)
    try:
        clock = RedisClock(sync)
        clock.measure()
        submitter = Submitter(settings, connection, sync, clock)
        request = InferenceRequest(model="bench/tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0)
        return [(await submitter.enqueue(request, owner="")).job_id for _ in range(count)]
    finally:
        await connection.aclose()


def one_size(settings: Settings, connection: redis.Redis, count: int, tokens: int) -> dict:
    """``count`` jobs of ``tokens`` tokens each, in one batch, from submit to finish."""
    base = used_memory(connection)
    job_ids = asyncio.run(submit_all(settings, connection, count, tokens))
    # RQ's part: a worker pops the job; on success (result_ttl=0) RQ deletes its hash.
    rq_queue = Queue.redis_queue_namespace_prefix + settings.queue
    for job_id in job_ids:
        connection.lrem(rq_queue, 0, job_id)
        connection.delete(f"rq:job:{job_id}")
    waiting = (keys.queued(settings.queue), keys.queued_for_model(settings.queue, "bench/tiny"), keys.fair(settings.queue))
    clock = RedisClock(connection)
    clock.measure()
    reporters = [JobReporter(connection, clock, job_id, settings.job_ttl_s, unqueue=waiting) for job_id in job_ids]
    for reporter in reporters:
        now = time.time()
        reporter.emit(Started(reporter.job_id, "bench/tiny", "bench-worker", now), JobState.running, **{job_record.STARTED_AT: now})
    writer = StepWriter(connection)
    for i in range(tokens):
        writer.send([c for r in reporters for c in r.token_commands(Token(WORDS[i % len(WORDS)], i))])
    writer.flush()
    writer.close()
    log_before = [usage(connection, keys.job_events(j)) for j in job_ids]
    record_before = [usage(connection, keys.job(j)) for j in job_ids]
    mem_tokens = used_memory(connection)
    output = "".join(WORDS[i % len(WORDS)] for i in range(tokens))
    for reporter in reporters:
        reporter.finish(
            End(tokens, 1000.0, 50.0, "max_tokens"), JobState.completed,
            **{job_record.OUTPUT: output, job_record.TOKENS_OUT: tokens, job_record.TTFT_MS: 50.0, job_record.DECODE_TIME_MS: 1000.0,
               job_record.LOAD_MS: 0.0, job_record.STOP_REASON: "max_tokens", job_record.PROMPT_TOKENS: 11},
        )
    mem_finished = used_memory(connection)
    log_after = [usage(connection, keys.job_events(j)) for j in job_ids]
    record_after = [usage(connection, keys.job(j)) for j in job_ids]
    entries_after = [connection.xlen(keys.job_events(j)) for j in job_ids]
    index = keys.jobs_index(settings.queue)
    index_share = usage(connection, index) / connection.zcard(index)
    left = sorted({k.decode().replace(job_ids[0], "<id>") for k in connection.scan_iter(f"*{job_ids[0]}*")})
    return {
        "tokens": tokens, "jobs": count,
        "log_before": statistics.median(log_before), "log_after": statistics.median(log_after),
        "record_before": statistics.median(record_before), "record_after": statistics.median(record_after),
        "entries_after": statistics.median(entries_after),
        "keys_before": statistics.median(a + b for a, b in zip(log_before, record_before)) + index_share,
        "keys_after": statistics.median(a + b for a, b in zip(log_after, record_after)) + index_share,
        "used_before": (mem_tokens - base) / count, "used_after": (mem_finished - base) / count,
        "keys_left": left,
    }


def measure(sizes: list[int], count: int, rounds: int, stream_node_max_bytes: int) -> dict[int, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="hive-bench-memory-") as tmp:
        proc, url = processes.start_redis(Path(tmp))
        connection = redis.Redis.from_url(url)
        if stream_node_max_bytes:
            connection.config_set("stream-node-max-bytes", stream_node_max_bytes)
        settings = Settings(redis_url=url, max_queue=10**8, max_queue_per_model=10**8)
        try:
            one_size(settings, connection, 5, max(sizes))  # warm-up: scripts loaded, allocator
            results: dict[int, list[dict]] = {n: [] for n in sizes}
            for r in range(rounds):
                for n in sizes:
                    connection.flushall()
                    results[n].append(one_size(settings, connection, count, n))
                    print(f"round {r + 1}: {n} tokens: {results[n][-1]['keys_after']:,.0f} bytes a job after finish", file=sys.stderr)
        finally:
            connection.close()
            proc.stop()
    return results


def report(results: dict[int, list[dict]]) -> str:
    lines = [
        "| tokens a job | replay log, tokens in (before compaction) | replay log, finished (compacted) | entries after | record, tokens in / finished | **a job, tokens in (before compaction)** | **a job, finished (compacted)** | bytes a token, before → after | used_memory delta a job, before → after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, runs in results.items():
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        col = lambda k: spread([r[k] for r in runs], ",.0f")  # noqa: E731
        lines.append(
            f"| {n:,} | {col('log_before')} B | {col('log_after')} B | {med('entries_after'):.0f} "
            f"| {med('record_before'):,.0f} / {med('record_after'):,.0f} B | **{col('keys_before')} B** | **{col('keys_after')} B** "
            f"| {med('keys_before') / n:.1f} → {med('keys_after') / n:.1f} | {col('used_before')} → {col('used_after')} B |"
        )
    keys_left = next(iter(results.values()))[0]["keys_left"]
    lines.append("")
    lines.append("Keys a finished job leaves for the TTL: " + ", ".join(f"`{k}`" for k in keys_left) + " (and its entry in the jobs index).")
    return "\n".join(lines)


def per_day(results: dict[int, list[dict]], tokens_per_s: float, job_tokens: int, ttl_s: int) -> str:
    """Steady-state memory at ``tokens_per_s`` in jobs of ``job_tokens``: each job kept ``ttl_s``."""
    runs = results.get(job_tokens)
    if runs is None:
        return ""
    after = statistics.median(r["keys_after"] for r in runs)
    # The same finished job had its log not been compacted: the log as it was, the final record.
    before = statistics.median(r["keys_after"] - r["log_after"] + r["log_before"] for r in runs)
    jobs_per_day = tokens_per_s / job_tokens * 86400
    kept = jobs_per_day * ttl_s / 86400
    return (
        f"At {tokens_per_s:,.0f} tokens/s in jobs of {job_tokens} tokens: {tokens_per_s / job_tokens:g} jobs/s, "
        f"{jobs_per_day:,.0f} jobs a day; with a {ttl_s / 3600:g} h TTL, {kept:,.0f} finished jobs kept at once × "
        f"{after:,.0f} B = {kept * after / 1e9:.2f} GB (uncompacted: × {before:,.0f} B = {kept * before / 1e9:.2f} GB; "
        f"issue 12's {ISSUE_BYTES_PER_TOKEN:.1f} B a token: {tokens_per_s * ttl_s * ISSUE_BYTES_PER_TOKEN / 1e9:.2f} GB of logs)."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,250,1000", help="tokens a job, comma-separated")
    parser.add_argument("--jobs", type=int, default=50, help="jobs of each size, in one batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-node-max-bytes", type=int, default=0, help="CONFIG SET it first (0: Redis's default, 4096)")
    parser.add_argument("--load-tokens-per-s", type=float, default=1000.0, help="the per-day figure's load")
    parser.add_argument("--load-job-tokens", type=int, default=250, help="the per-day figure's job size (one of --sizes)")
    parser.add_argument("--ttl-s", type=int, default=keys.JOB_TTL_S, help="the job TTL (HIVE_JOB_TTL_S)")
    args = parser.parse_args(argv)
    results = measure([int(n) for n in args.sizes.split(",")], args.jobs, args.rounds, args.stream_node_max_bytes)
    print(report(results))
    print()
    print(per_day(results, args.load_tokens_per_s, args.load_job_tokens, args.ttl_s))
    return results


if __name__ == "__main__":
    main()
