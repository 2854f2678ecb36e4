"""Redis commands per generated token, for the whole cluster (hive, worker, relay),
from redis-server's own INFO commandstats.

    python -m bench.redis_cmds                # writes the "## Redis commands" section of docs/benchmarks.md
    python -m bench.redis_cmds --rounds 3 --tokens 200 --no-write

Real processes: redis-server on a free port, a hub endpoint serving a tiny
generated model, ``hive serve`` and one ``hive worker``. The model is warmed by
one job first. Then, per measurement: CONFIG RESETSTAT, one job submitted over
HTTP and followed over SSE to ``[DONE]``, a settle pause (the worker's and RQ's
bookkeeping after the last event), INFO commandstats. Jobs of two lengths
(short, long) separate the per-token cost from the per-job one; an idle window
measures the time-driven background (heartbeats, the hive's periodic sweeps),
which is subtracted pro rata. Target: at most 2 commands per generated token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import redis
from httpx_sse import connect_sse

from bench.cluster import one_worker_cluster
from bench.doc import replace_section
from bench.figure import Figure, spread
from tests.tiny_models import build_model

TINY = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128)
REPO = "bench/tiny"
PROMPT = "The quick brown fox jumps over the lazy dog."
TARGET = 2.0
#: The benchmark's own commands, left out of the counts.
OWN = {"config|resetstat", "info"}


def command_counts(connection: redis.Redis) -> Counter:
    stats = connection.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items() if name.removeprefix("cmdstat_") not in OWN})


def follow_job(client: httpx.Client, max_tokens: int) -> int:
    """Submits one job and follows it to [DONE]; returns the tokens received."""
    body = {"model": REPO, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    job = client.post("/v1/inference", json=body)
    job.raise_for_status()
    tokens = 0
    with connect_sse(client, "GET", job.json()["sse_url"]) as source:
        for sse in source.iter_sse():
            if sse.event == "token":
                tokens += 1
            elif sse.event == "error":
                raise RuntimeError(sse.data)
            elif sse.data == "[DONE]":
                break
    return tokens


def counted(connection: redis.Redis, action, settle_s: float) -> tuple[Counter, float]:
    """Commands the cluster ran during ``action`` and the settle pause after it, and the window's seconds."""
    connection.config_resetstat()
    start = time.perf_counter()
    action()
    time.sleep(settle_s)
    return command_counts(connection), time.perf_counter() - start


def net(counts: Counter, seconds: float, background: dict[str, float]) -> dict[str, float]:
    """``counts`` less the background expected in a window of ``seconds``."""
    names = set(counts) | set(background)
    return {n: counts.get(n, 0) - background.get(n, 0.0) * seconds for n in names}


def measure(client: httpx.Client, connection: redis.Redis, rounds: int, short: int, long: int, idle_s: float, settle_s: float) -> dict:
    follow_job(client, 2)  # the worker downloads and loads the model: later jobs are warm
    follow_job(client, short)
    idle, idle_seconds = counted(connection, lambda: None, idle_s)
    background = {n: c / idle_seconds for n, c in idle.items()}
    runs = {"short": [], "long": []}
    for i in range(rounds):
        for kind, n in (("short", short), ("long", long)) if i % 2 == 0 else (("long", long), ("short", short)):
            tokens = 0

            def job():
                nonlocal tokens
                tokens = follow_job(client, n)

            counts, seconds = counted(connection, job, settle_s)
            runs[kind].append({"tokens": tokens, "seconds": seconds, "raw": dict(counts), "net": net(counts, seconds, background)})
        print(f"round {i + 1}: short {sum(runs['short'][-1]['raw'].values())} commands / {runs['short'][-1]['tokens']} tokens, "
              f"long {sum(runs['long'][-1]['raw'].values())} / {runs['long'][-1]['tokens']}", file=sys.stderr)
    return {"background_per_s": background, "idle_s": idle_seconds, "runs": runs}


def analyse(result: dict) -> dict:
    runs = result["runs"]
    per_token, per_job, amortized, by_command_token, by_command_job, raw_per_token = [], [], [], [], [], []
    for s, l in zip(runs["short"], runs["long"]):
        extra_tokens = l["tokens"] - s["tokens"]
        raw_per_token.append((sum(l["raw"].values()) - sum(s["raw"].values())) / extra_tokens)
        names = set(s["net"]) | set(l["net"])
        token_cmds = {n: (l["net"].get(n, 0) - s["net"].get(n, 0)) / extra_tokens for n in names}
        per_token.append(sum(token_cmds.values()))
        per_job.append(sum(s["net"].values()) - per_token[-1] * s["tokens"])
        by_command_token.append(token_cmds)
        by_command_job.append({n: s["net"].get(n, 0) - token_cmds[n] * s["tokens"] for n in names})
        amortized.append(sum(l["net"].values()) / l["tokens"])
    names = sorted(set().union(*by_command_token), key=lambda n: -statistics.median([d.get(n, 0) for d in by_command_job]) - 1000 * statistics.median([d.get(n, 0) for d in by_command_token]))
    # The commands whose count grows with the tokens (slope ≥ 0.5 a token); the others'
    # slopes are the background's noise around zero.
    scaling = [n for n in names if statistics.median([d.get(n, 0) for d in by_command_token]) >= 0.5]
    return {
        "scaling": scaling,
        "scaling_per_token": [sum(d.get(n, 0) for n in scaling) for d in by_command_token],
        "raw_per_token": raw_per_token,
        "per_token": per_token,
        "per_job": per_job,
        "amortized": amortized,
        "by_command": [(n, [d.get(n, 0) for d in by_command_token], [d.get(n, 0) for d in by_command_job]) for n in names],
    }


def figures(a: dict, long: int) -> list[Figure]:
    per_token = statistics.median(a["scaling_per_token"])
    return [
        Figure("redis", "commands per generated token (" + " + ".join(n.upper() for n in a["scaling"]) + ")", f"≤ {TARGET:.0f}", spread(a["scaling_per_token"], ".2f"), per_token <= TARGET),
        Figure("redis", "commands per job outside the token loop", "report", spread(a["per_job"], ".0f"), None),
        Figure("redis", f"all commands / tokens, {long}-token job", "report", spread(a["amortized"], ".2f"), None),
    ]


def report(result: dict, a: dict) -> str:
    runs = result["runs"]
    lines = [
        "| figure | measured |",
        "| --- | --- |",
        f"| tokens per job: short, long | {runs['short'][0]['tokens']}, {runs['long'][0]['tokens']} |",
        f"| commands per job, raw: short, long | {spread([sum(r['raw'].values()) for r in runs['short']], '.0f')}, {spread([sum(r['raw'].values()) for r in runs['long']], '.0f')} |",
        f"| background while idle, commands/s | {sum(result['background_per_s'].values()):.1f} |",
        f"| **commands per generated token**: those that grow with the tokens ({', '.join(n.upper() for n in a['scaling'])}), per extra token of the long job (target ≤ {TARGET:.0f}) | **{spread(a['scaling_per_token'], '.2f')}** |",
        f"| all commands per extra token, background subtracted | {spread(a['per_token'], '.2f')} |",
        f"| all commands per extra token, raw (background included) | {spread(a['raw_per_token'], '.2f')} |",
        f"| commands per job outside the token loop | {spread(a['per_job'], '.1f')} |",
        f"| all commands of the long job / its tokens | {spread(a['amortized'], '.2f')} |",
        "",
        "| command | per token | per job, outside the loop | idle, per s |",
        "| --- | --- | --- | --- |",
    ]
    for name, token, job in a["by_command"]:
        if max(abs(statistics.median(token)), abs(statistics.median(job))) < 0.05 and result["background_per_s"].get(name, 0) < 0.05:
            continue
        lines.append(f"| {name} | {statistics.median(token):.2f} | {statistics.median(job):.1f} | {result['background_per_s'].get(name, 0):.2f} |")
    return "\n".join(lines)


def write_doc(table: str, command: str, rounds: int, short: int, long: int, settle_s: float, verdict: str) -> None:
    from bench.relay import machine

    section = f"""## Redis commands per generated token

Command: `{command}`. Machine: {machine()}.
Measured {time.strftime('%Y-%m-%d')}.

The whole cluster's commands, as redis-server counts them (`INFO commandstats`, after a
`CONFIG RESETSTAT`; the benchmark's own INFO and CONFIG left out): a real `hive serve`, one
real `hive worker` and the SSE relay, on a tiny generated model already loaded (warm). Each
measurement is one job (greedy) submitted over HTTP and followed over SSE to `[DONE]`, then
{settle_s:.1f} s for the bookkeeping after the last event. {rounds} rounds of a {short}-token and a {long}-token
job, alternating. The time-driven background (heartbeats, the hive's sweeps), measured in an idle
window first, is subtracted pro rata (a rough correction: the background comes in bursts, once a
second). Per token: the long job's extra commands over the short one's, per extra token; the
target figure counts the commands whose count grows with the tokens (slope ≥ 0.5), the others'
slopes being the background's noise around zero. "Outside the token loop" is what remains of the
short job.
Medians, min–max in brackets.

{table}

{verdict}

Per token the worker sends one pipelined round trip: XADD to the job's replay log and PUBLISH
to its live channel (`worker/cluster/reporter.py`); the hive's relay receives the pub/sub message,
which is not a command, and reads the log (XRANGE) only to catch up when a follower connects
or falls behind. Outside the token loop: the submit's MULTI (job record, queue, index), RQ's
enqueue, dequeue and finish bookkeeping, the worker taking the job (`JobReporter`: one MULTI)
and its lease, the state updates and the `queued`, `started` and `end` events, and the relay's
subscribe and catch-up reads.
"""
    replace_section("Redis commands", section)


def run(rounds: int, short: int, long: int, idle_s: float, settle_s: float, write: bool, command: str) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="hive-bench-redis-") as tmp:
        tmp_path = Path(tmp)
        build_model(tmp_path / "hub" / REPO, **TINY)
        with one_worker_cluster(tmp_path) as cluster:
            connection = redis.Redis.from_url(cluster.redis_url)
            try:
                with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(30, read=300)) as client:
                    result = measure(client, connection, rounds, short, long, idle_s, settle_s)
            finally:
                connection.close()
    a = analyse(result)
    figs = figures(a, long)
    table = report(result, a)
    verdict = f"Target ≤ {TARGET:.0f} commands per generated token: {'met' if figs[0].met else 'MISSED'} ({figs[0].measured})."
    print(table + "\n\n" + verdict)
    print("raw: " + json.dumps(result["runs"]["long"][0]["raw"]), file=sys.stderr)
    if write:
        write_doc(table, command, rounds, short, long, settle_s, verdict)
    return figs


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200, help="tokens of the long job")
    parser.add_argument("--short-tokens", type=int, default=20, help="tokens of the short job")
    parser.add_argument("--idle-s", type=float, default=3.0, help="idle window measuring the background")
    parser.add_argument("--settle-s", type=float, default=1.0, help="pause after [DONE] before reading the counts")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    command = f"python -m bench.redis_cmds --rounds {args.rounds} --tokens {args.tokens} --short-tokens {args.short_tokens}"
    return run(args.rounds, args.short_tokens, args.tokens, args.idle_s, args.settle_s, not args.no_write, command)


if __name__ == "__main__":
    main()
