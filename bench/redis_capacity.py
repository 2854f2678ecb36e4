"""Redis capacity of the token path: tokens per second one redis-server carries
when batching workers send every decode step's tokens as one pipeline.

    python -m bench.redis_capacity                               # B = 1, 8, 32; no persistence, then AOF everysec
    python -m bench.redis_capacity --batch 32 --rounds 3 --seconds 4 --persistence none

Real parts: a redis-server of its own on a free port (``--save ""``; with
``aof``, ``--appendonly yes --appendfsync everysec`` as compose runs it), the
worker's own ``JobReporter.token_commands`` (XADD to the job's replay log and
PUBLISH to its channel, two commands a token) sent through the worker's own
``StepWriter`` (one pipeline per step, replies read before the next send), one
token for each of B jobs per step, as fast as this process can. One subscriber
process holds one connection subscribed to all B jobs' channels, as a hive's
relay does, and drains the messages (hiredis on a raw socket: a fast reader, so
Redis, not the reader, is what is measured; the relay's own cost is bench/fanout.py's).

Per round: tokens/s achieved, the commands/s redis-server ran (INFO
commandstats after CONFIG RESETSTAT), redis-server's CPU (/proc/<pid>/stat,
all its threads), the writer's and the subscriber's CPU, and the messages the
subscriber received against those published. The writer, the subscriber and
redis-server share this machine's cores, so the achieved figure is a floor; the
ceiling at one full Redis core, tokens/s ÷ Redis's busy fraction, is an
extrapolation (it assumes Redis's cost per token stays flat up to a full core).
The CPU the rest of the machine spent meanwhile (/proc/stat, less the three
measured processes) is shown too: the cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import hiredis
import redis

from bench.figure import spread
from bench.proc import cpu_seconds
from shared.clock import RedisClock
from shared.events import Token
from tests import processes
from worker.cluster.reporter import JobReporter
from worker.engine.step_writer import StepWriter

#: The benchmark's own commands, left out of the counts.
OWN = {"config|resetstat", "info", "flushall", "ping"}
STOP_CHANNEL = "bench:stop"
#: A typical token's text (a BPE piece: a leading space and a short word).
TEXT = " the"
PERSISTENCE = {
    "none": ["--save", "", "--appendonly", "no"],
    "aof": ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
}


def start_redis(persistence: str, log_dir: Path) -> tuple[processes.Proc, str]:
    port = processes.free_port()
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed")
    command = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(log_dir), *PERSISTENCE[persistence]]
    proc = processes.start(f"redis-{persistence}", command, log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    processes.wait_until(client.ping, 10, "redis-server", (proc,))
    client.close()
    return proc, url


# --- the subscriber process: one connection, every job's channel ------------------


def drain_main(port: int) -> None:
    """Reads channel names from stdin (to an empty line), subscribes, prints
    ``ready``; counts messages until one arrives on STOP_CHANNEL, then prints the
    count and its own CPU seconds (process_time) spent draining."""
    channels = [line.strip() for line in iter(sys.stdin.readline, "\n") if line.strip()] + [STOP_CHANNEL]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(hiredis.pack_command(("SUBSCRIBE", *channels)))
    reader = hiredis.Reader()
    acks = received = 0
    stopped = False
    while not stopped:
        data = sock.recv(1 << 20)
        if not data:  # Redis dropped us: past its pub/sub output buffer limit
            raise SystemExit(f"redis-server closed the subscriber after {received} messages")
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if reply[0] == b"subscribe":
                acks += 1
                if acks == len(channels):
                    print(json.dumps({"ready": True, "cpu_s": time.process_time()}), flush=True)
            elif reply[1] == STOP_CHANNEL.encode():
                stopped = True
            else:
                received += 1
    print(json.dumps({"received": received, "cpu_s": time.process_time()}), flush=True)


# --- the writer: this process, as a batching worker's step loop ------------------


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have spent busy (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def step_commands(reporters: list[JobReporter], i: int) -> list[bytes]:
    """One decode step: token ``i`` of every job, as the engine packs it."""
    commands: list[bytes] = []
    for reporter in reporters:
        commands.extend(reporter.token_commands(Token(TEXT, i)))
    return commands


def one_round(url: str, redis_pid: int, batch: int, seconds: float, prepacked: int = 0) -> dict:
    """``prepacked``: pack this many tokens before the clock starts, then only
    send them (Redis loaded harder than the worker's own packing lets it)."""
    control = redis.Redis.from_url(url)
    connection = redis.Redis.from_url(url)
    clock = RedisClock(connection)
    clock.measure()
    reporters = [JobReporter(connection, clock, f"bench-capacity-{uuid.uuid4().hex}", 3600) for _ in range(batch)]
    drain = subprocess.Popen(
        [sys.executable, "-m", "bench.redis_capacity", "--drain", str(connection.connection_pool.connection_kwargs["port"])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    drain.stdin.write("".join(r._channel + "\n" for r in reporters) + "\n")
    drain.stdin.flush()
    drain_start = json.loads(drain.stdout.readline())["cpu_s"]
    writer = StepWriter(connection)
    packed = [step_commands(reporters, i) for i in range(-(-prepacked // batch))] if prepacked else []
    control.config_resetstat()
    redis_cpu, own_cpu, machine_cpu = cpu_seconds(redis_pid), time.process_time(), machine_busy_seconds()
    start = time.perf_counter()
    end = start + seconds
    steps = 0
    if prepacked:
        for commands in packed:
            writer.send(commands)
        steps = len(packed)
    else:
        while time.perf_counter() < end:
            writer.send(step_commands(reporters, steps))
            steps += 1
    writer.flush()  # every command sent is in Redis
    elapsed = time.perf_counter() - start
    redis_cpu, own_cpu = cpu_seconds(redis_pid) - redis_cpu, time.process_time() - own_cpu
    machine_cpu = machine_busy_seconds() - machine_cpu
    stats = control.info("commandstats")
    commands_run = sum(v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") not in OWN)
    control.publish(STOP_CHANNEL, "")
    drained = json.loads(drain.stdout.readline())
    drain.wait(10)
    writer.close()
    control.flushall()
    connection.close()
    control.close()
    tokens = steps * batch
    subscriber_cpu = drained["cpu_s"] - drain_start
    return {
        "batch": batch, "tokens": tokens, "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "commands_per_s": commands_run / elapsed,
        "commands_per_token": commands_run / tokens,
        "redis_cores": redis_cpu / elapsed,
        "writer_cores": own_cpu / elapsed,
        "subscriber_cores": subscriber_cpu / elapsed,
        # Everything else on the machine: another user's processes, the kernel's own.
        "other_cores": max(0.0, machine_cpu - redis_cpu - own_cpu - subscriber_cpu) / elapsed,
        "received_ratio": drained["received"] / tokens,
        "ceiling_tokens_per_s": tokens / elapsed / (redis_cpu / elapsed),
    }


def measure(batches: list[int], rounds: int, seconds: float, persistence: str, prepacked: int) -> dict[int, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="hive-bench-capacity-") as tmp:
        proc, url = start_redis(persistence, Path(tmp))
        try:
            one_round(url, proc.process.pid, max(batches), 1.0)  # warm-up: connections, allocator
            results: dict[int, list[dict]] = {b: [] for b in batches}
            for r in range(rounds):
                for b in batches if r % 2 == 0 else list(reversed(batches)):
                    result = one_round(url, proc.process.pid, b, seconds, prepacked)
                    results[b].append(result)
                    print(f"{persistence} B={b} round {r + 1}: {result['tokens_per_s']:,.0f} tokens/s, "
                          f"redis {result['redis_cores']:.2f} cores", file=sys.stderr)
        finally:
            proc.stop()
    return results


def report(all_results: dict[str, dict[int, list[dict]]]) -> str:
    lines = [
        "| persistence | B (jobs a step) | tokens/s achieved | Redis commands/s | commands/token | redis-server CPU (cores) | writer CPU | subscriber CPU | other processes' CPU | received / published | **tokens/s at 1 full Redis core (extrapolated)** |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for persistence, results in all_results.items():
        for b, runs in results.items():
            col = lambda k, fmt: spread([r[k] for r in runs], fmt)  # noqa: E731
            lines.append(
                f"| {persistence} | {b} | {col('tokens_per_s', ',.0f')} | {col('commands_per_s', ',.0f')} | {col('commands_per_token', '.3f')} "
                f"| {col('redis_cores', '.2f')} | {col('writer_cores', '.2f')} | {col('subscriber_cores', '.2f')} "
                f"| {col('other_cores', '.2f')} | {col('received_ratio', '.3f')} | **{col('ceiling_tokens_per_s', ',.0f')}** |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,32", help="jobs per decode step (one token each), comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each round")
    parser.add_argument("--persistence", default="none,aof", help="none (no RDB, no AOF) and/or aof (appendonly, fsync everysec)")
    parser.add_argument("--prepacked", type=int, default=0, help="pack this many tokens a round before timing, then only send them (0: pack per step, like the worker)")
    parser.add_argument("--json", help="also write the raw rounds to this file")
    parser.add_argument("--drain", type=int, help=argparse.SUPPRESS)  # the subscriber process
    args = parser.parse_args(argv)
    if args.drain:
        drain_main(args.drain)
        return {}
    batches = [int(b) for b in args.batch.split(",")]
    label = lambda p: f"{p}, pre-packed" if args.prepacked else p  # noqa: E731
    all_results = {label(p): measure(batches, args.rounds, args.seconds, p, args.prepacked) for p in args.persistence.split(",")}
    print(report(all_results))
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=1))
    return all_results


if __name__ == "__main__":
    main()
