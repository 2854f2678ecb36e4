"""Fleet: warm versus cold time to first token; submit → start with two workers.

Submit → start is measured with a stream of jobs for two models.

    python -m bench.fleet                      # writes the "## Fleet" section of docs/benchmarks.md
    python -m bench.fleet --runs 1 --jobs 20 --no-write

Everything runs as real processes: redis-server on a free port, a hub endpoint
serving generated models, `hive serve` and two `hive worker`s sharing one hub
cache (one machine, two devices).

Warm versus cold: two 135M-shaped Llamas (random weights). Each round, for each
model, four one-token jobs: cold with the model downloaded (first removed from
the machine's hub cache), warm (the next job, routed to
the worker that now holds it; sent with keep_alive 0, so the model unloads after
it), cold with the model cached on disk, warm again. TTFT is timed at the client,
from the POST to the first `token` event.

Submit → start: both workers hold both of two small models; jobs for a random one
of them arrive as a Poisson stream at a load the workers sustain and at one that
saturates them (the workers pause --token-delay-ms after each token, a GPU's pace
that leaves the CPU to the hive). From each job's status: submit → picked, submit
→ started, its worker, whether it ran warm, and the time it waited while a worker
was idle (between two jobs a worker is idle unless its next job was already
waiting where it looks: then it was turning around). Target: no job waits while
a worker is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from bench.doc import DOC, replace_section
from bench.fleet_cluster import (
    COLD_CACHED,
    COLD_DESCRIPTION,
    COLD_DOWNLOADED,
    COLD_MODELS,
    IDLE_WAIT_THRESHOLD_S,
    PROMPT,
    SHAPES,
    STREAM_MODELS,
    WARM,
    WORKERS,
    Cluster,
    log_findings,
    print_findings,
    start_cluster,
)
from bench.fleet_stream import (
    analyse,
    dist,
    load_both_models_on_both_workers,
    run_stream,
    service_time_s,
)
from bench.relay import machine
from tests import processes
from tests.tiny_models import build_model

# ------------------------------------------------------ warm versus cold TTFT


@dataclass
class FirstToken:
    kind: str
    model: str
    client_ttft_ms: float
    queue_ms: float
    #: Client side, from the POST: the first `loading` event (none when warm), `ready`.
    to_loading_ms: float | None
    to_ready_ms: float
    load_ms: float
    worker_ttft_ms: float
    worker: str


def one_token_job(client: httpx.Client, cluster: Cluster, model: str, kind: str, keep_alive: float | None) -> FirstToken:
    cluster.wait_all_idle()
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    start = time.perf_counter()
    job = client.post("/v1/inference", json=body).json()
    first_at: dict[str, float] = {}
    first_data: dict[str, dict] = {}
    with connect_sse(client, "GET", job["sse_url"]) as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            if sse.data == "[DONE]":
                break
            first_at.setdefault(sse.event, (time.perf_counter() - start) * 1000)
            first_data.setdefault(sse.event, json.loads(sse.data))
            if sse.event == "error":
                raise RuntimeError(f"{kind} job for {model} failed: {sse.data}")
    status = client.get(job["status_url"]).json()
    # The job must have started the way it is counted.
    download, warm = first_data.get("download"), first_data["ready"]["warm"]
    expected = {
        COLD_DOWNLOADED: download is not None and not download["cached"] and not warm,
        COLD_CACHED: download is not None and download["cached"] and not warm,
        WARM: download is None and "loading" not in first_at and warm,
    }[kind]
    if not expected:
        raise RuntimeError(f"a job counted as {kind} started otherwise: {sorted(first_at, key=first_at.get)}, {first_data.get('download')}")
    return FirstToken(
        kind,
        model,
        first_at["token"],
        status["timings"]["queue_ms"],
        first_at.get("loading"),
        first_at["ready"],
        status["timings"]["load_ms"],
        status["timings"]["ttft_ms"],
        status["worker"],
    )


def wait_unloaded(cluster: Cluster, model: str) -> None:
    processes.wait_until(
        lambda: all(model not in held for held in cluster.models_held().values()), 30, f"{model} to unload", tuple(cluster.procs)
    )


def drop_from_cache(cluster: Cluster, model: str) -> None:
    """Removes the model from the workers' hub cache, as from a fresh machine's.

    Not with DELETE /v1/models: each worker sharing the cache deletes the folder
    when its listener gets to it, which can be after another worker has already
    downloaded the model again for the next job (that job then fails to load)."""
    shutil.rmtree(cluster.cache_folder(model), ignore_errors=True)


def warm_versus_cold(cluster: Cluster, runs: int) -> list[FirstToken]:
    samples = []
    with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(30, read=300)) as client:
        for run in range(runs):
            print(f"warm versus cold: round {run + 1}/{runs}", file=sys.stderr)
            for model in COLD_MODELS:
                drop_from_cache(cluster, model)
                samples.append(one_token_job(client, cluster, model, COLD_DOWNLOADED, None))
                samples.append(one_token_job(client, cluster, model, WARM, 0))  # then unloads
                wait_unloaded(cluster, model)
                samples.append(one_token_job(client, cluster, model, COLD_CACHED, None))
                samples.append(one_token_job(client, cluster, model, WARM, 0))
                wait_unloaded(cluster, model)
    return samples


# ------------------------------------------------------------------ report


def spread(values: list) -> str:
    """median (min–max)."""
    if any(v is None for v in values):
        return "–"
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def first_token_table(samples: list[FirstToken]) -> str:
    warm = statistics.median(s.client_ttft_ms for s in samples if s.kind == WARM)
    lines = [
        "| start | jobs | client TTFT ms | × warm | submit → picked ms | POST → first `loading` ms | POST → `ready` ms | worker's load_ms | worker's own TTFT ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in (COLD_DOWNLOADED, COLD_CACHED, WARM):
        rows = [s for s in samples if s.kind == kind]
        lines.append(
            f"| {kind} | {len(rows)} | {spread([s.client_ttft_ms for s in rows])} | {statistics.median(s.client_ttft_ms for s in rows) / warm:.1f}× | "
            f"{spread([s.queue_ms for s in rows])} | {spread([s.to_loading_ms for s in rows])} | {spread([s.to_ready_ms for s in rows])} | "
            f"{spread([s.load_ms for s in rows])} | "
            f"{spread([s.worker_ttft_ms for s in rows])} |"
        )
    return "\n".join(lines)


def stream_table(results: list[dict]) -> str:
    lines = [
        ("| load (rate) | offered jobs/s | jobs | submit → picked ms | submit → started ms | client TTFT ms | picked → finished ms "
        "| warm | routed to an idle holder | jobs per worker | waited > 50 ms while a worker was idle (target 0) | longest such wait ms |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        jobs = f"{r['done']}" + (f", {len(r['failed'])} failed" if r["failed"] else "") + (f", {len(r['retried'])} retried" if r["retried"] else "")
        notes = [f"{r['handed_on']} handed on"] * bool(r["handed_on"]) + [f"{r['overtook']} overtook older jobs"] * bool(r["overtook"])
        routed = f"{r['routed_own']}" + (f" ({', '.join(notes)})" if notes else "")
        lines.append(
            f"| {r['load']:.0%} ({r['rate']:.1f}/s) | {r['offered']:.1f} | {jobs} | {dist(r['queue_ms'])} | {dist(r['to_started_ms'])} | "
            f"{dist(r['client_ttft_ms'])} | {dist(r['service_ms'])} | {r['warm'] / r['done']:.0%} | {routed} | "
            f"{' / '.join(str(n) for n in r['per_worker'].values())} | **{len(r['waited'])}** | {max(r['idle_wait_ms']):.0f} |"
        )
    return "\n".join(lines)


def summary(samples: list[FirstToken], results: list[dict]) -> str:
    warm = statistics.median(s.client_ttft_ms for s in samples if s.kind == WARM)
    cold = {k: statistics.median(s.client_ttft_ms for s in samples if s.kind == k) for k in (COLD_DOWNLOADED, COLD_CACHED)}
    lines = [
        (f"- Warm TTFT {warm:.0f} ms; cold {cold[COLD_CACHED]:.0f} ms when cached on disk ({cold[COLD_CACHED] / warm:.0f}×), "
        f"{cold[COLD_DOWNLOADED]:.0f} ms when downloaded ({cold[COLD_DOWNLOADED] / warm:.0f}×).")
    ]
    for r in results:
        turnaround = dist(r["turnaround_ms"]) if r["turnaround_ms"] else "none back to back"
        verdict = "met" if not r["waited"] else "MISSED"
        lines.append(
            f"- Load {r['load']:.0%}: {len(r['waited'])} of {r['done']} jobs waited more than {IDLE_WAIT_THRESHOLD_S * 1000:.0f} ms while a worker "
            f"was idle (target 0: {verdict}); the longest idle wait {max(r['idle_wait_ms']):.0f} ms. {r['warm']} of {r['done']} ran warm; "
            f"{r['routed_own']} were routed to an idle holder, {r['overtook']} of them ahead of jobs that had waited longer on the shared queue. "
            f"A worker's turnaround (one job's end to its next pickup, a job waiting): {turnaround} ms."
        )
    return "\n".join(lines)


def write_doc(doc: Path, command: str, samples_table: str, stream_md: str, verdicts: str, raw: str, args) -> None:
    section = f"""## Fleet: warm versus cold time to first token, and submit → start with two workers

Command: `{command}`. Machine: {machine()}.
Measured {time.strftime('%Y-%m-%d')}.

A real redis-server, a hub endpoint serving generated models from local disk, `hive serve` and two
`hive worker`s sharing one hub cache, as two devices of one machine would.

**Warm versus cold.** {COLD_DESCRIPTION[args.cold_shape]}
{args.runs} round{"s" if args.runs != 1 else ""}; in each, for each model, four one-token jobs in a row: cold with the model downloaded
(its folder first removed from the workers' hub cache), warm (the next job, which the hive routes
to the worker now holding it; sent with `keep_alive: 0`, so the model unloads after it), cold with the
model cached on disk (in the OS page cache too: it was just read), warm again. Both workers had loaded
a model before (the small ones below), so no cold start here pays a worker's one-time imports. Client
TTFT runs from the POST to the first `token` event at the client; the next columns place the first
`loading` event (after the download, or the look into the cache) and `ready` on the same clock; load_ms
is the worker's loading time, the worker's own TTFT its prefill. Medians, min–max in brackets; × warm
is the ratio of medians.

{samples_table}

**Submit → start with two workers and a stream of jobs for two models.** Both workers first hold both of
two small Llamas (4 layers, 64 wide); each pauses {args.token_delay_ms:g} ms after every token (a GPU's pace: the
decode leaves the CPU to the hive), and a job asks for {args.max_tokens} tokens. Jobs for a random one of
the two models arrive as a Poisson stream, {args.jobs} at each load; the load is the arrival rate over
what two workers serve (twice the inverse of one warm job's median picked → finished, measured first).
From each job's status: submit → picked (`queue_ms`), submit → started, its worker, and whether it ran
warm (`ready.warm`). Between two of its jobs a worker either turns around (when it finished the last
one, a job was waiting where it looks, on the shared queue or its own: RQ's bookkeeping and the pickup
follow) or is idle (nothing it looks at was waiting); it is idle before its first job and after its
last. A job that spent more than {IDLE_WAIT_THRESHOLD_S * 1000:.0f} ms of its wait while a worker was idle counts as having waited
while a worker could have run it (both hold both models: any idle one could). "Routed to an idle
holder": jobs the hive put on an idle worker's own queue; "handed on": of those, the ones another
worker ran (the reaper moved them); "overtook older jobs": the ones picked before jobs that had waited
longer on the shared queue. Medians, p90 and max.

{stream_md}

{verdicts}

What it means: a job for a model a worker holds starts from memory, its TTFT that of the prompt's
prefill plus the hive's round trips; a cold one pays the load (and the download) first, which is
what warm routing saves. Below the workers' capacity a job should be picked within milliseconds of its
submit; past it, jobs queue, but no worker should stand idle while they do.

Raw: the warm/cold jobs (kind, model, client TTFT, submit → picked, POST → first `loading`, POST →
`ready`, load_ms, the worker's TTFT, in ms; worker), and the jobs that waited while a worker was idle
(times in s from the stream's first submit):

```
{raw}
```
"""
    replace_section("Fleet", section, doc)


# -------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="warm versus cold rounds (each: both models, 4 jobs each)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs in the stream at each load")
    parser.add_argument("--loads", default="0.6,1.5", help="arrival rate over the two workers' capacity, one stream each")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per job of the stream")
    parser.add_argument("--token-delay-ms", type=float, default=25.0, help="the workers' pause after each token")
    parser.add_argument("--cold-shape", choices=sorted(SHAPES), default="llama-135m", help="shape of the warm/cold models")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    parser.add_argument("--log-level", default="warning", help="of the hive and the workers (their logs are scanned for warnings)")
    parser.add_argument("--doc", type=Path, default=DOC, help="the file whose Fleet section is written")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    command = (
        f"python -m bench.fleet --runs {args.runs} --jobs {args.jobs} --loads {args.loads} --max-tokens {args.max_tokens} "
        f"--token-delay-ms {args.token_delay_ms:g} --seed {args.seed}" + (f" --cold-shape {args.cold_shape}" if args.cold_shape != "llama-135m" else "")
    )
    # SIGTERM unwinds like Ctrl-C, so the processes started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results = []
    with tempfile.TemporaryDirectory(prefix="hive-fleet-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        for model, seed in COLD_MODELS.items():
            print(f"building {model} ({args.cold_shape})…", file=sys.stderr)
            build_model(root / "hub" / model, seed=seed, **SHAPES[args.cold_shape])
        for model, seed in STREAM_MODELS.items():
            build_model(root / "hub" / model, seed=seed, **SHAPES["tiny"])
        cluster = start_cluster(root, stack, args.token_delay_ms, args.log_level)

        try:
            # First: a worker's first load pays one-time imports, which no cold start below should.
            print("loading both stream models on both workers", file=sys.stderr)
            load_both_models_on_both_workers(cluster, 20)

            samples = warm_versus_cold(cluster, args.runs)

            service_s = service_time_s(cluster, args.max_tokens)
            print(f"one warm job takes {service_s * 1000:.0f} ms (picked → finished)", file=sys.stderr)
            for n, load in enumerate(loads):
                rate = load * len(WORKERS) / service_s
                print(f"submit → start: {args.jobs} jobs at load {load:.0%} ({rate:.1f} jobs/s)", file=sys.stderr)
                held = cluster.models_held()
                if not all(set(STREAM_MODELS) <= set(models) for models in held.values()):
                    raise RuntimeError(f"a worker dropped a stream model: {held}")
                cluster.wait_all_idle()
                stream = asyncio.run(run_stream(cluster, rate, args.jobs, args.max_tokens, args.seed + n))
                results.append(analyse(stream, list(WORKERS), load, rate))
        except Exception:
            for proc in cluster.procs:  # what the processes said, before their logs go
                print(f"\n{proc.name} log, last lines:\n  " + "\n  ".join(proc.log().splitlines()[-30:]), file=sys.stderr)
            raise
        findings = log_findings(cluster)

    samples_table = first_token_table(samples)
    stream_md = stream_table(results)
    verdicts = summary(samples, results)
    print(samples_table + "\n\n" + stream_md + "\n\n" + verdicts)
    raw = "\n".join(
        [
            *(json.dumps([round(v, 1) if isinstance(v, float) else v for v in vars(s).values()], ensure_ascii=False) for s in samples),
            *(f"load {r['load']:.0%}, waited while a worker was idle: " + (json.dumps(r["waited"][:10], indent=1) if r["waited"] else "none")
              + (f"\n… and {len(r['waited']) - 10} more" if len(r["waited"]) > 10 else "") for r in results),
        ]
    )
    print(raw, file=sys.stderr)
    for r in results:
        if r["waited"] or r["failed"] or r["retried"] or r["handed_on"]:
            print(f"\nload {r['load']:.0%}: failed {r['failed']}, retried {r['retried']}", file=sys.stderr)
            print("timeline (index, job, model, routed to, ran on, created, picked, finished; s):", file=sys.stderr)
            for row in r["timeline"]:
                print("  " + " ".join(str(x) for x in row), file=sys.stderr)
    print_findings(findings)
    if not args.no_write:
        write_doc(args.doc, command, samples_table, stream_md, verdicts, raw, args)


if __name__ == "__main__":
    main()
