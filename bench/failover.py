"""Redis failovers under load: how many events a failover loses, and how long
streams and submits stall.

Each round starts a fresh Sentinel deployment (tests/sentinel_cluster.py: a master,
two replicas, three Sentinels, min-replicas-to-write 1, down-after 1 s), a real
`hive serve` and a real `hive worker` (``--max-batch`` jobs at once, no pause
but ``--token-delay-ms`` a step, so that jobs outlast the failover) on a
redis+sentinel:// URL.
It submits ``--jobs`` jobs of mixed lengths, follows each over SSE, and once every
job is generating it fails the master over: ``kill`` SIGKILLs it (it takes what it
had not yet replicated with it), ``sentinel`` runs SENTINEL FAILOVER (a replica is
promoted while the master still runs: until the Sentinels have moved the other nodes
over, the old master keeps taking writes, lost when it rejoins as a replica). Counted per round: events lost (the sum of
the ``gap`` events the streams got), streams whose ids went backwards or repeated
(must be 0), jobs that ended with ``end`` vs an error, the longest pause between two
events of a stream across the failover, how long submits were refused (503) after
the failover began, and how many jobs accepted (202) around it were gone afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.doc import replace_section
from bench.figure import spread
from tests import processes
from tests.sentinel_cluster import SentinelCluster
from tests.sse import follow, lost_events
from tests.tiny_models import build_model

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog. " * 4, "Hello"]


def one_round(mode: str, jobs: int, batch: int, tokens: int, delay_ms: float, models: Path, work: Path, min_replicas: int = 1) -> dict:
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    hub_proc, hub_url = processes.start_hub(models, log_dir)
    cluster = SentinelCluster(log_dir, work)
    try:
        cluster.start()
        url, hive, worker = cluster.serve(
            hub_url,
            work / "hf",
            name="failover",
            hive_args=("--redis-min-replicas", str(min_replicas)),
            worker_args=("--max-batch", str(batch), "--token-delay-ms", str(delay_ms)),
        )
        # Warm: the model is loaded before the measured jobs.
        follow(url, httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": "x", "max_tokens": 2}).json()["sse_url"])
        submitted = []
        for k in range(jobs):
            body = {"model": "acme/tiny", "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": tokens // (1 + k % 3), "temperature": 0}
            submitted.append(httpx.post(f"{url}/v1/inference", json=body, timeout=10).json())
        results: dict = {}
        threads = [threading.Thread(target=lambda j=j: results.update({j["job_id"]: follow(url, j["sse_url"], timeout=120)})) for j in submitted]
        for thread in threads:
            thread.start()
        processes.wait_until(lambda: processes.health(url)["followers"] >= jobs, 30, "every stream open", (hive,))
        with redis.Redis(port=cluster.master_port()) as client:
            first = submitted[-1]["job_id"]
            processes.wait_until(lambda: client.xlen(f"hive:job:{first}:events") >= 10, 60, "every job generating", (worker,))
        failed_at = time.monotonic()
        if mode == "kill":
            cluster.kill_master()
        else:
            with redis.Redis(port=next(iter(cluster.sentinels))) as client:
                client.sentinel_failover("hive")
        # Submits through the failover, until 2 s after the first one accepted: each
        # 202 is checked at the end (a 404 then is a job the failover lost after its 202).
        refused_until, accepted, first_accepted = failed_at, [], None
        while time.monotonic() - failed_at < 60 and (first_accepted is None or time.monotonic() - first_accepted < 2):
            response = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": "x", "max_tokens": 1}, timeout=10)
            if response.status_code == 202:
                accepted.append(response.json()["job_id"])
                first_accepted = first_accepted or time.monotonic()
            elif first_accepted is None:
                refused_until = time.monotonic()
            time.sleep(0.05)
        for thread in threads:
            thread.join(120)
        processes.wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 30, "the hive settled", (hive,))
        vanished = sum(httpx.get(f"{url}/v1/inference/{job_id}", timeout=10).status_code == 404 for job_id in accepted)
        lost = broken = ended = 0
        pauses = []
        for job in submitted:
            received = results.get(job["job_id"], [])
            try:
                lost += lost_events(received)
            except AssertionError:
                broken += 1
            ended += bool(received) and received[-2].event == "end"
            around = [r.at for r in received if r.at >= failed_at - 5]
            pauses.append(max((b - a for a, b in zip(around, around[1:])), default=0.0))
        return {
            "lost": lost,
            "broken": broken,
            "ended": ended,
            "jobs": jobs,
            "pause_s": max(pauses),
            "refused_s": refused_until - failed_at,
            "accepted": len(accepted),
            "vanished": vanished,
            "worker_alive": worker.process.poll() is None,
        }
    finally:
        cluster.stop()
        hub_proc.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=600, help="the longest job's max_tokens (others: 1/2, 1/3 of it)")
    parser.add_argument("--modes", default="kill,sentinel")
    parser.add_argument("--min-replicas", type=int, default=1, help="the hive's --redis-min-replicas (of the 2 replicas)")
    parser.add_argument("--token-delay-ms", type=float, default=10.0, help="the worker's pause after each step, so jobs outlast the failover")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hive-failover-") as tmp:
        root = Path(tmp)
        build_model(root / "models" / "acme" / "tiny")
        for mode in args.modes.split(","):
            rounds = []
            for n in range(args.rounds):
                work = root / f"{mode}-{n}"
                work.mkdir()
                rounds.append(one_round(mode, args.jobs, args.max_batch, args.tokens, args.token_delay_ms, root / "models", work, args.min_replicas))
                print(mode, rounds[-1], flush=True)
            rows.append((mode, rounds))
    command = (
        f"python -m bench.failover --rounds {args.rounds} --jobs {args.jobs} --max-batch {args.max_batch} "
        f"--tokens {args.tokens} --token-delay-ms {args.token_delay_ms:g} --modes {args.modes} --min-replicas {args.min_replicas}"
    )
    table = ["| figure | " + " | ".join(mode for mode, _ in rows) + " |", "| --- |" + " --- |" * len(rows)]
    for label, key, fmt in (
        ("events lost, all streams of a round", "lost", ".0f"),
        ("streams with an id backwards, repeated or skipped unannounced", "broken", ".0f"),
        ("jobs that ended with `end` (of the round's jobs)", "ended", ".0f"),
        ("longest pause between two events of a stream, s", "pause_s", ".1f"),
        ("submits refused (503) after the failover began, s", "refused_s", ".1f"),
        ("submits accepted (202) in the 2 s after the first one", "accepted", ".0f"),
        ("of those, jobs gone afterwards (404): lost after their 202", "vanished", ".0f"),
    ):
        table.append(f"| {label} | " + " | ".join(spread([r[key] for r in rounds], fmt) for _, rounds in rows) + " |")
    alive = all(r["worker_alive"] for _, rounds in rows for r in rounds)
    from bench.relay import machine

    section = f"""## Failover, --redis-min-replicas {args.min_replicas}

Command: `{command}`. Machine: {machine()}.
Measured {time.strftime('%Y-%m-%d')}.

{__doc__.split(chr(10), 2)[2].strip()}

{args.jobs} jobs on one worker (`--max-batch {args.max_batch}`), {args.rounds} rounds per mode; medians, min–max in brackets.
The worker process lived through every round: {'yes' if alive else 'NO'}.

{chr(10).join(table)}
"""
    print(section)
    if not args.no_write:
        replace_section(f"Failover, --redis-min-replicas {args.min_replicas}", section)


if __name__ == "__main__":
    main()
