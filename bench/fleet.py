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
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse, connect_sse

from bench.doc import DOC, replace_section
from bench.relay import machine
from shared import jobs as job_fields
from shared import keys
from tests import processes
from tests.tiny_models import build_model

PROMPT = "The quick brown fox jumps over the lazy dog."
SHAPES = {
    # Shaped like SmolLM2-135M (as bench.relay's): 0.5 GB of float32 weights in two shards.
    "llama-135m": {"hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "shards": 2},
    "tiny": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
}
COLD_DESCRIPTION = {
    "llama-135m": "Two 135M-shaped Llamas (random weights, 0.5 GB of float32 in two shards).",
    "tiny": "Two tiny Llamas (4 layers, 64 wide, 0.7 MB).",
}
#: Different seeds: the hub endpoint derives the commit from the files' contents.
COLD_MODELS = {"bench/fleet-a": 1, "bench/fleet-b": 2}
STREAM_MODELS = {"bench/stream-a": 3, "bench/stream-b": 4}
WORKERS = ("w1", "w2")
#: A job queued this long or less while a worker was idle counts as not waiting:
#: an idle worker's pickup (BLPOP, RQ's bookkeeping) takes a few milliseconds.
IDLE_WAIT_THRESHOLD_S = 0.05
COLD_DOWNLOADED, COLD_CACHED, WARM = "cold, downloaded", "cold, cached on disk", "warm"


# ---------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    url: str
    redis_url: str
    hub_url: str
    hf_home: Path
    queue: str = keys.DEFAULT_QUEUE
    procs: list = field(default_factory=list)

    def cache_folder(self, model: str) -> Path:
        return self.hf_home / "hub" / ("models--" + model.replace("/", "--"))

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/workers", timeout=5).json()["workers"]

    def models_held(self) -> dict[str, list[str]]:
        """Worker name → the models it holds loaded."""
        return {w["id"]: sorted(m["model"] for m in w["models"]) for w in self.workers()}

    def wait_all_idle(self) -> None:
        """A job's stream ends before its worker lists itself as idle again: a job
        submitted in between finds no idle holder of its model (it goes to the
        shared queue, and may start cold on another worker)."""
        processes.wait_until(lambda: all(w["state"] == "idle" for w in self.workers()), 30, "the workers to be idle", tuple(self.procs))


def start_cluster(root: Path, stack: ExitStack, token_delay_ms: float, log_level: str) -> Cluster:
    logs = root / "logs"
    logs.mkdir()
    redis_proc, redis_url = processes.start_redis(logs)
    stack.callback(redis_proc.stop)
    hub_proc, hub_url = processes.start_hub(root / "hub", logs)
    stack.callback(hub_proc.stop)
    port = processes.free_port()
    cluster = Cluster(f"http://127.0.0.1:{port}", redis_url, hub_url, root / "hf")
    # --no-hub: the workers download from the hub endpoint, and the hive fetches nothing.
    hive = processes.start(
        "hive",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--no-hub", "--log-level", log_level),
        logs,
        env={"HF_HOME": str(root / "hive-hf")},
    )
    stack.callback(hive.stop)
    cluster.procs.append(hive)
    for name in WORKERS:
        worker = processes.start(
            name,
            processes.hive_command(
                "worker", "--redis-url", redis_url, "--device", "cpu", "--name", name,
                "--token-delay-ms", str(token_delay_ms), "--keep-alive", "-1", "--log-level", log_level,
            ),
            logs,
            env={"HF_ENDPOINT": hub_url, "HF_HOME": str(cluster.hf_home)},
        )
        stack.callback(worker.stop)
        cluster.procs.append(worker)
    processes.wait_until(lambda: len(cluster.models_held()) == len(WORKERS), processes.STARTUP_TIMEOUT_S, "hive and workers", tuple(cluster.procs))
    # The hub endpoint hashes a model's files on its first request: not part of any download timed here.
    for model in (*COLD_MODELS, *STREAM_MODELS):
        httpx.get(f"{hub_url}/api/models/{model}", timeout=120).raise_for_status()
    return cluster


def log_findings(cluster: Cluster) -> dict[str, list[str]]:
    """Warnings, errors and tracebacks in each process's log, each job named in
    them followed by how that job ended."""
    found = {}
    for proc in cluster.procs:
        lines = [line for line in proc.log().splitlines() if any(w in line for w in (" WARNING ", " ERROR ", "Traceback"))]
        for n, line in enumerate(lines):
            for job_id in set(re.findall(r"\b[0-9a-f]{32}\b", line)):
                status = httpx.get(f"{cluster.url}/v1/inference/{job_id}", timeout=5).json()
                outcome = {k: status.get(k) for k in ("state", "attempt", "worker", "stop_reason", "error")}
                lines[n] += f"\n    → job {job_id[:8]}: {json.dumps(outcome)}, total {status.get('timings', {}).get('total_ms')} ms"
        if lines:
            found[proc.name] = lines
    return found


def print_findings(findings: dict[str, list[str]]) -> None:
    for name, lines in findings.items():
        print(f"\n{name} log: {len(lines)} warnings or errors, first ones:\n  " + "\n  ".join(lines[:10]), file=sys.stderr)


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


# ------------------------------------------------- submit → start, a stream


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
            routed = (await connection.hget(keys.job(job.job_id), job_fields.RQ_QUEUE) or b"").decode()
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
