"""Submit: sustained ``POST /v1/inference`` per second through one ``hive serve``,
with its latency, next to raw RQ enqueues per second from one Python process.

    python -m bench.submit                    # writes the "## Submit" section of docs/benchmarks.md
    python -m bench.submit --rounds 3 --seconds 6 --no-write
    python -m bench.submit --rounds 1 --profile   # and py-spy records the hive during the closed-loop run

Real processes: redis-server on a free port and one ``hive serve`` (one uvicorn
process) on its own queue, with depth limits far above what a run submits, so no
request is answered 429; no worker: the jobs just queue, and the benchmark
FLUSHDBs its own redis between runs. The load generator is this process (not the
hive's): an ``httpx.AsyncClient`` with keep-alive and N concurrent connections
posting a small valid body, in two kinds of run:

- closed loop: N connections each post again as soon as the last answer came,
  for the run's seconds: the most the hive answers;
- open loop at the target rate: requests are due at a fixed pace and latency is
  measured from when each was due (so a stalled hive is not hidden by the
  client waiting for it: no coordinated omission); the achieved rate is the 202s
  per second.

The reference: ``rq.Queue.enqueue_call`` (JSONSerializer, the function name the
hive uses, ``shared.jobs.RUN_INFERENCE``) in a loop from one Python process, for
the same seconds. Target: at least 1,500 submits per second with p99 at most 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from bench.doc import replace_section
from bench.figure import Figure, spread
from bench.proc import cpu_seconds
from shared.jobs import RUN_INFERENCE
from tests import processes

QUEUE = "hive:bench-submit"
BODY = {"model": "bench/tiny", "prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": 16, "temperature": 0}
TARGET_RATE = 1500
TARGET_P99_MS = 50.0
LIMIT = 100_000_000


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client for one request shape: the request's bytes
    built once, the answer read by its Content-Length. httpx spends about a core on
    some 250 requests a second, more than the hive does, so it cannot load the hive
    from the same 2 cores (``--client httpx`` measures it anyway)."""

    def __init__(self, host: str, port: int, body: bytes):
        self.host, self.port = host, port
        self.request = (
            f"POST /v1/inference HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> int:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def load(url: str, seconds: float, connections: int, rate: float | None, client_kind: str = "raw") -> dict:
    """``rate`` None: closed loop. Otherwise requests are due every 1/rate s and
    latency counts from when each was due; those still unsent when the run ends are
    counted as ``late`` (the shortfall of the achieved rate)."""
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    ok = 0
    slot = 0
    late = 0
    parsed = httpx.URL(url)
    body = json.dumps(BODY).encode()
    if client_kind == "raw":
        conns = [RawConnection(parsed.host, parsed.port, body) for _ in range(connections)]
        await asyncio.gather(*(c.open() for c in conns))
        client = None
    else:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        client = httpx.AsyncClient(base_url=url, limits=limits, timeout=10)
        # Open the connections first, so the run measures keep-alive requests.
        await asyncio.gather(*(client.get("/health") for _ in range(connections)))
        conns = [None] * connections
    start = time.perf_counter()
    end = start + seconds

    async def one(conn) -> None:
        nonlocal ok, slot, late
        while True:
            if rate is None:
                due = time.perf_counter()
                if due >= end:
                    return
            else:
                due = start + slot / rate
                if due >= end:
                    return
                slot += 1
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif time.perf_counter() >= end:
                    late += int((end - due) * rate) + 1  # this one and those due after it, unsent
                    slot = int(seconds * rate) + 1
                    return
            try:
                if conn is not None:
                    status = await asyncio.wait_for(conn.post(), 10)
                else:
                    status = (await client.post("/v1/inference", content=body, headers={"content-type": "application/json"})).status_code
                if status == 202:
                    ok += 1
                    latencies.append(time.perf_counter() - due)
                else:
                    errors[str(status)] += 1
            except (TimeoutError, httpx.HTTPError, OSError, asyncio.IncompleteReadError) as e:
                errors[type(e).__name__] += 1
                if conn is not None:
                    return

    cpu = time.process_time()
    await asyncio.gather(*(one(c) for c in conns))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if client is not None:
        await client.aclose()
    else:
        for c in conns:
            c.close()
    return {
        "per_s": ok / elapsed,
        "ok": ok,
        "late": late,
        "seconds": elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * max(latencies, default=float("nan")),
        "errors": dict(errors),
        "client_cpu": cpu / elapsed,
    }


def raw_enqueues(redis_url: str, seconds: float) -> dict:
    """``enqueue_call`` in a loop from this process, as the hive calls it (JSON serializer)."""
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(QUEUE + "-raw", connection=connection, serializer=JSONSerializer)
    spec = {**BODY, "revision": None}
    n = 0
    latencies = []
    start = time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        job_id = uuid.uuid4().hex
        queue.enqueue_call(RUN_INFERENCE, args=(job_id, spec), job_id=job_id, timeout=3600, result_ttl=0, failure_ttl=86400)
        latencies.append(time.perf_counter() - now)
        n += 1
    elapsed = time.perf_counter() - start
    connection.close()
    return {"per_s": n / elapsed, "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99)}


#: py-spy's file paths → where the hive's CPU time goes, by the leaf-most frame that matches.
LAYERS = [
    ("redis-py: packing commands, parsing replies, socket calls", ("redis/",)),
    ("RQ: building the job (enqueue_call, Job.to_dict, JSON)", ("rq/",)),
    ("pydantic: validating the body, model_dump(_json)", ("pydantic",)),
    ("uvicorn + h11: HTTP parsing and writing", ("h11/", "uvicorn/")),
    ("starlette: routing, middleware, Request.json, JSONResponse", ("starlette/",)),
    ("anyio: the run_in_threadpool hand-off", ("anyio/", "threading.py", "queue.py")),
    ("asyncio: the event loop, transports", ("asyncio/", "selectors.py")),
    ("json (stdlib)", ("json/",)),
    ("hive's own code", ("hive/", "shared/")),
]
#: Inclusive shares of these frames (JobService._enqueue's steps).
STEPS = [
    ("JobService.submit → _enqueue (in the threadpool), all of it", "JobService._enqueue (hive/jobs.py"),
    ("  the ZCARD ×2 pipeline (depth limits), round trip 1", "JobService._enqueue (hive/jobs.py:120)"),
    ("  the claim Lua script (EVALSHA), round trip 2", "JobService._enqueue (hive/jobs.py:129)"),
    ("  building the MULTI (HSET, XADD, ZADD…, RQ's job)", "JobService._enqueue (hive/jobs.py:156)"),
    ("  executing the MULTI, round trip 3", "JobService._enqueue (hive/jobs.py:157)"),
    ("  model_dump_json / model_dump of the spec", "model_dump"),
]


def profile_summary(collapsed: Path) -> list[tuple[str, float]]:
    """Shares of the hive's GIL-holding samples (its CPU time in Python; waits on
    sockets release the GIL and are not counted) by layer, then by step of the submit."""
    layers: collections.Counter = collections.Counter()
    steps: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        for frame in reversed(frames):
            layer = next((name for name, needles in LAYERS if any(needle in frame for needle in needles)), None)
            if layer:
                layers[layer] += n
                break
        else:
            layers["other (interpreter, stdlib)"] += n
        for name, needle in STEPS:
            if any(needle in f for f in frames):
                steps[name] += n
    if not total:
        return []
    return [(name, layers[name] / total) for name, _ in LAYERS + [("other (interpreter, stdlib)", ())]] + [(name, steps[name] / total) for name, _ in STEPS]


def run(rounds: int, seconds: float, connections: int, rate: float, profile: bool, write: bool, command: str, client: str = "raw", sustain: float = 300, hive_processes: int = 1) -> list[Figure]:
    results = {"closed": [], "open": [], "sustain": [], "raw": [], "hive_cpu": []}
    prof = None
    with tempfile.TemporaryDirectory(prefix="hive-bench-submit-") as tmp:
        logs = Path(tmp)
        redis_proc, redis_url = processes.start_redis(logs)
        port = processes.free_port()
        url = f"http://127.0.0.1:{port}"
        hive = processes.start(
            "hive",
            processes.hive_command(
                "serve", "--redis-url", redis_url, "--port", str(port), "--queue", QUEUE, "--no-hub",
                "--max-queue", str(LIMIT), "--max-queue-per-model", str(LIMIT), "--log-level", "warning",
                "--processes", str(hive_processes),
            ),
            logs,
        )
        connection = redis.Redis.from_url(redis_url)
        try:
            processes.wait_until(lambda: bool(processes.health(url)), 60, "hive", (hive,))
            asyncio.run(load(url, 1.0, connections, None, client))  # warm-up
            for i in range(rounds):
                connection.flushdb()
                cpu0, t0 = cpu_seconds(hive.process.pid, children=True), time.perf_counter()
                spy = None
                if profile and i == 0 and shutil.which("py-spy"):
                    prof = logs / "hive.collapsed"
                    spy = subprocess.Popen(
                        ["py-spy", "record", "--gil", "--nonblocking", "-d", str(int(seconds)), "-r", "100", "-p", str(hive.process.pid), "-f", "raw", "-o", str(prof)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                    time.sleep(0.5)
                results["closed"].append(asyncio.run(load(url, seconds, connections, None, client)))
                results["hive_cpu"].append((cpu_seconds(hive.process.pid, children=True) - cpu0) / (time.perf_counter() - t0))
                if spy is not None:
                    spy.wait(30)
                connection.flushdb()
                results["open"].append(asyncio.run(load(url, seconds, connections, rate, client)))
                connection.flushdb()
                results["sustain"].append(asyncio.run(load(url, seconds, connections, sustain, client)))
                connection.flushdb()
                results["raw"].append(raw_enqueues(redis_url, seconds))
                c, o, r = results["closed"][-1], results["open"][-1], results["raw"][-1]
                print(
                    f"round {i + 1}: closed {c['per_s']:.0f}/s p50 {c['p50_ms']:.1f} p99 {c['p99_ms']:.1f} ms (hive CPU {results['hive_cpu'][-1]:.2f} cores, client {c['client_cpu']:.2f}); "
                    f"open @{rate:.0f}/s: {o['per_s']:.0f}/s p50 {o['p50_ms']:.1f} p99 {o['p99_ms']:.1f} ms errors {o['errors']} late {o['late']}; open @{sustain:.0f}/s: p99 {results['sustain'][-1]['p99_ms']:.1f} ms; raw RQ {r['per_s']:.0f}/s",
                    file=sys.stderr,
                )
            if prof is not None and prof.exists():
                shutil.copy(prof, "/tmp/submit.collapsed")
        finally:
            connection.close()
            for proc in (hive, redis_proc):
                proc.stop()
        profile_lines = profile_summary(prof) if prof is not None and prof.exists() else []

    closed, opened, raw = results["closed"], results["open"], results["raw"]
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    errors = sum(sum(r["errors"].values()) for r in closed + opened + results["sustain"])
    met = med(opened, "per_s") >= TARGET_RATE * 0.99 and med(opened, "p99_ms") <= TARGET_P99_MS and med(closed, "per_s") >= TARGET_RATE
    figs = [
        Figure("submit", f"POST /v1/inference per second, closed loop, {connections} connections", f"≥ {TARGET_RATE:,}", spread([r["per_s"] for r in closed], ".0f"), med(closed, "per_s") >= TARGET_RATE),
        Figure("submit", f"p99 latency, open loop at {rate:.0f}/s (achieved {med(opened, 'per_s'):.0f}/s)", f"≤ {TARGET_P99_MS:.0f} ms", spread([r["p99_ms"] for r in opened], ".1f") + " ms", met),
        Figure("submit", "raw RQ enqueue_call per second, one process (reference)", "report", spread([r["per_s"] for r in raw], ".0f"), None),
    ]
    table = "\n".join([
        "| figure | measured |",
        "| --- | --- |",
        f"| closed loop, {connections} connections: 202s per second | **{spread([r['per_s'] for r in closed], '.0f')}** |",
        f"| closed loop: latency p50 / p99 | {spread([r['p50_ms'] for r in closed], '.1f')} / {spread([r['p99_ms'] for r in closed], '.1f')} ms |",
        f"| closed loop: hive CPU, cores busy / client CPU, cores busy | {spread(results['hive_cpu'], '.2f')} / {spread([r['client_cpu'] for r in closed], '.2f')} |",
        f"| open loop at {rate:.0f}/s: 202s per second | {spread([r['per_s'] for r in opened], '.0f')} |",
        f"| open loop at {rate:.0f}/s: latency from due time, p50 / p99 / max | {spread([r['p50_ms'] for r in opened], '.1f')} / **{spread([r['p99_ms'] for r in opened], '.1f')}** / {spread([r['max_ms'] for r in opened], '.0f')} ms |",
        f"| open loop at {rate:.0f}/s: due but unsent when the run ended | {spread([r['late'] for r in opened], '.0f')} |",
        f"| open loop at {sustain:.0f}/s: 202s per second | {spread([r['per_s'] for r in results['sustain']], '.0f')} |",
        f"| open loop at {sustain:.0f}/s: latency from due time, p50 / p99 / max | {spread([r['p50_ms'] for r in results['sustain']], '.1f')} / {spread([r['p99_ms'] for r in results['sustain']], '.1f')} / {spread([r['max_ms'] for r in results['sustain']], '.0f')} ms |",
        f"| errors (non-202 or transport), all runs | {errors} |",
        f"| raw RQ `enqueue_call` per second, one process (reference) | {spread([r['per_s'] for r in raw], '.0f')} |",
        f"| raw RQ `enqueue_call` latency p50 / p99 | {spread([r['p50_ms'] for r in raw], '.2f')} / {spread([r['p99_ms'] for r in raw], '.2f')} ms |",
        f"| hive closed loop / raw RQ | {statistics.median(c['per_s'] / r['per_s'] for c, r in zip(closed, raw)):.2f}× |",
    ])
    verdict = (
        f"Target ≥ {TARGET_RATE:,} submits/s with p99 ≤ {TARGET_P99_MS:.0f} ms: {'met' if met else 'MISSED'} "
        f"(closed loop {med(closed, 'per_s'):.0f}/s; at {rate:.0f}/s offered, {med(opened, 'per_s'):.0f}/s achieved with p99 {med(opened, 'p99_ms'):.1f} ms)."
    )
    prof_table = ""
    if profile_lines:
        prof_table = "\n".join(["| where the hive's CPU time goes (py-spy --gil, closed loop; layer by the leaf-most frame, then steps inclusive) | share |", "| --- | --- |"] + [f"| {n} | {s:.0%} |" for n, s in profile_lines])
    print(table + "\n\n" + verdict + ("\n\n" + prof_table if prof_table else ""))
    print("raw: " + json.dumps(results), file=sys.stderr)
    if write:
        write_doc(table, verdict, prof_table, command, rounds, seconds, connections, rate)
    return figs


def write_doc(table: str, verdict: str, prof_table: str, command: str, rounds: int, seconds: float, connections: int, rate: float) -> None:
    from bench.relay import machine

    section = f"""## Submit

Command: `{command}`. Machine: {machine()}.
Measured {time.strftime('%Y-%m-%d')}, with nothing else running on this machine.

One `hive serve` (one uvicorn process) on its own redis-server, no worker: the jobs just queue
(the benchmark FLUSHDBs its redis between runs; depth limits far above a run's count, so no 429).
The load generator is the benchmark's own process: a minimal asyncio HTTP/1.1 client, keep-alive,
{connections} connections opened before the run, posting a small valid `POST /v1/inference` body (httpx's
`AsyncClient` spent a whole core on about 230 requests/s, more than the hive, so it could not load the
hive from the same 2 cores; `--client httpx` still measures with it). It shares the 2 cores with the
hive and redis-server; its own CPU is in the table. {rounds} rounds of {seconds:.0f} s each: closed loop (each
connection posts again as soon as it has its answer: the most the hive answers), open loop at
{rate:.0f} requests/s (latency counted from when each request was due, so queueing behind a slow hive
counts), open loop at a rate the hive keeps up with, and the reference: `rq.Queue.enqueue_call` (JSONSerializer, `{RUN_INFERENCE}`) in a loop
from one Python process, one Redis round trip each. Medians, min–max in brackets.

{table}

{verdict}
{chr(10) + prof_table + chr(10) if prof_table else ''}
{PROFILE_NOTES}
"""
    replace_section("Submit", section)


#: Where the time goes per submit, from py-spy on the hive during a closed-loop run
#: (see the report of the run that wrote this section).
PROFILE_NOTES = """\
Where the time goes. The hive is CPU-bound: in the closed loop it keeps about one core busy (one
uvicorn process, one GIL) at some 370–440 submits/s, about 2.5 ms of CPU per submit; 1,500/s in one
process needs about 0.65 ms. py-spy (`--gil`: samples of the thread holding the GIL, i.e. its CPU
time in Python; a few hundred samples, so ± a few %) puts about half of it inside
`JobService._enqueue`, run in anyio's threadpool, and nearly half of all of it in redis-py's
pure-Python command packing (`PythonRespSerializer.pack`, `Encoder.encode`), reply parsing (no
hiredis installed) and socket calls, for three round trips per submit: the ZCARD ×2 pipeline of
the depth limits, the claim script (EVALSHA, run even with no worker at all), and the MULTI of
about 14 commands (job record, its TTLs, the `queued` event, the jobs index with its
ZREMRANGEBYSCORE, the two depth ZADDs, RQ's job HSET and queue push). The table above gives the
rest: uvicorn + h11, starlette, the threadpool hand-off, RQ's job building (`Job.to_dict`,
`utcformat`, JSON); pydantic is a few %.

Proposed fixes, in the order of their expected gain; 2 is applied since (before it, with the
fan-out benchmark running beside: 381/s closed loop, p99 140 ms; the figures above are after,
on a quiet machine):
1. One round trip per submit: one Lua script (or a MULTI whose commands no longer depend on the
   checks) that checks both depths, claims an idle warm worker and writes the job, or at least
   the depth checks folded into the claim script; and drop the per-submit ZREMRANGEBYSCORE of the
   jobs index (trim it in the hive's periodic sweep instead).
2. `redis[hiredis]`: the C reply parser (and cheaper per-command overhead).
3. Submit on the event loop with `redis.asyncio` instead of `run_in_threadpool` and the sync client:
   no thread hand-off, no GIL ping-pong between the loop and 40 threads.
4. Write RQ's job hash directly (its fields are fixed) instead of `enqueue_call` building a `Job`.
5. uvicorn with `httptools` instead of h11, and several hive processes (`--workers`, or a second
   `hive serve` behind the same Redis): the hive holds no per-process state for a submit. On these
   2 cores, shared with redis-server and the client, that alone cannot reach 1,500/s; with 1–3 it
   should.
"""


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run (closed, open, raw)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="the open loop's offered requests per second")
    parser.add_argument("--sustain-rate", type=float, default=300, help="a second open loop, at a rate the hive keeps up with")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="the load generator: a minimal keep-alive HTTP/1.1 client, or httpx.AsyncClient")
    parser.add_argument("--hive-processes", type=int, default=1, help="hive processes sharing the port (hive serve --processes)")
    parser.add_argument("--profile", action="store_true", help="py-spy the hive during the first closed-loop run")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    command = f"python -m bench.submit --rounds {args.rounds} --seconds {args.seconds:g} --connections {args.connections} --sustain-rate {args.sustain_rate:g}" + (" --profile" if args.profile else "") + (f" --client {args.client}" if args.client != "raw" else "") + (f" --hive-processes {args.hive_processes}" if args.hive_processes != 1 else "")
    return run(args.rounds, args.seconds, args.connections, args.rate, args.profile, not args.no_write, command, args.client, args.sustain_rate, args.hive_processes)


if __name__ == "__main__":
    main()
