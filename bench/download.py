"""Download: the worker's ``fetch_model``, with its progress events, versus plain
``hf_hub_download`` of the same files from the same local hub endpoint.

    python -m bench.download                 # 5 rounds, writes the "## Download" section of docs/benchmarks.md
    python -m bench.download --rounds 3 --no-write

A 135M-shaped Llama (0.5 GB, two safetensors shards) is served unthrottled by
``python -m hive.hub.folders``. Each round downloads it once each way into a fresh,
empty hub cache, the order alternating between rounds: ``worker.model.download.fetch_model``
with the worker's emit (each ``download`` event through a real ``JobReporter``:
XADD + PUBLISH pipelined to a real redis-server), and ``hf_hub_download`` of the
same files. Both sides run in one child process started with ``HF_ENDPOINT`` set,
because huggingface_hub reads it at import. Target: at most 1.02×.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.doc import replace_section
from bench.figure import Figure, spread
from tests import processes
from tests.tiny_models import build_model

SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152, shards=2)
REPO = "bench/llama-135m"
TARGET = 1.02
PLAIN_SMALL_CHUNKS = "hf_hub_download, 256 KiB chunks"


def measure(redis_url: str, scratch: Path, rounds: int) -> dict:
    """In the child, with HF_ENDPOINT set: seconds per round for each side."""
    import redis
    from huggingface_hub import HfApi, constants, hf_hub_download

    from shared.clock import RedisClock
    from worker.cluster.reporter import JobReporter
    from worker.model.download import HUB_CHUNK_BYTES, _wanted, fetch_model

    default_chunk = constants.DOWNLOAD_CHUNK_SIZE  # fetch_model sets its own, for the whole process
    info = HfApi().model_info(REPO, files_metadata=True)
    files = sorted(s.rfilename for s in info.siblings if _wanted(s.rfilename))
    size = sum(s.size for s in info.siblings if _wanted(s.rfilename))
    connection = redis.Redis.from_url(redis_url)
    events: list[int] = []

    def with_progress() -> None:
        reporter = JobReporter(connection, RedisClock(connection), f"bench-download-{uuid.uuid4().hex}", 60)
        count = 0

        def emit(event) -> None:
            nonlocal count
            count += 1
            reporter.emit(event)

        fetch_model(REPO, None, emit)
        events.append(count)

    def plain(chunk: int):
        def download() -> None:
            constants.DOWNLOAD_CHUNK_SIZE = chunk
            for name in files:
                hf_hub_download(REPO, name)

        return download

    # The third side isolates what the events cost: the same downloads as the worker's,
    # in the worker's 256 KiB chunks, without them.
    sides = {"fetch_model + events": with_progress, "hf_hub_download": plain(default_chunk), PLAIN_SMALL_CHUNKS: plain(HUB_CHUNK_BYTES)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(rounds + 1):  # round 0 warms every path and is not counted
        order = list(sides)[i % len(sides):] + list(sides)[: i % len(sides)]  # each side leads in turn
        for name in order:
            cache = scratch / f"cache-{i}-{name.split()[0]}"
            constants.HF_HUB_CACHE = str(cache)
            start = time.perf_counter()
            sides[name]()
            seconds = time.perf_counter() - start
            got = sum(p.stat().st_size for p in cache.glob("models--*/blobs/*"))
            assert got == size, (name, got, size)
            shutil.rmtree(cache)
            if i:
                times[name].append(seconds)
        if i:
            print(f"round {i}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in sides), file=sys.stderr)
    connection.close()
    return {"times": times, "files": len(files), "bytes": size, "events": events[1:]}


def ratios(result: dict, baseline: str) -> list[float]:
    times = result["times"]
    return [a / b for a, b in zip(times["fetch_model + events"], times[baseline])]


def figures(result: dict) -> list[Figure]:
    figs = []
    for baseline, what in (("hf_hub_download", "hf_hub_download"), (PLAIN_SMALL_CHUNKS, "the same in 256 KiB chunks (the events alone)")):
        r = ratios(result, baseline)
        ratio = statistics.median(r)
        figs.append(Figure("download", f"fetch_model + events / {what}, 135M", f"≤ {TARGET:.2f}×", f"{ratio:.3f}× ({min(r):.3f}–{max(r):.3f}×)", ratio <= TARGET))
    return figs


def report(result: dict) -> str:
    times = result["times"]
    plain, small = ratios(result, "hf_hub_download"), ratios(result, PLAIN_SMALL_CHUNKS)
    mb = result["bytes"] / 2**20
    return "\n".join(
        [
            "| side | seconds | MiB/s |",
            "| --- | --- | --- |",
            *(f"| {name} | {spread(values, '.2f')} | {spread([mb / s for s in values], '.0f')} |" for name, values in times.items()),
            f"| fetch_model + events / hf_hub_download (per round, target ≤ {TARGET:.2f}×) | {statistics.median(plain):.3f}× ({min(plain):.3f}–{max(plain):.3f}×) | |",
            f"| fetch_model + events / hf_hub_download in 256 KiB chunks: the events alone | {statistics.median(small):.3f}× ({min(small):.3f}–{max(small):.3f}×) | |",
        ]
    )


def write_doc(result: dict, table: str, rounds: int, verdict: str) -> None:
    from bench.relay import machine

    section = f"""## Download: fetch_model with progress events versus plain hf_hub_download

Command: `python -m bench.download --rounds {rounds}`. Machine: {machine()}.
Measured {time.strftime('%Y-%m-%d')}.

A random-weights Llama shaped like SmolLM2-135M ({result['files']} files, {result['bytes'] / 2**20:.0f} MiB, the weights in two
safetensors shards) served unthrottled over loopback by `python -m hive.hub.folders`. Each round
downloads it once each way into a fresh, empty hub cache (deleted after), the order alternating;
{rounds} rounds after one untimed round of each. "fetch_model + events" is
`worker.model.download.fetch_model` as the worker calls it: the hub's file list
(`model_info`), the download lock, 256 KiB chunks, and each `download` event
({spread([float(n) for n in result['events']], '.0f')} a download, at most 10 a second) sent through a real `JobReporter`
(XADD + PUBLISH pipelined to a real redis-server). "hf_hub_download" is
`huggingface_hub.hf_hub_download(repo, file)` for the same files, with huggingface_hub's default
10 MiB chunks and no progress bar (no TTY). Both run in one child process started with
`HF_ENDPOINT` pointing at the endpoint. Medians, min–max in brackets; the ratio is per round,
then the median.

{table}

{verdict}
"""
    replace_section("Download", section)


def run(rounds: int, write: bool) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="hive-bench-download-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "logs").mkdir()
        print("building the 135M-shaped model…", file=sys.stderr)
        build_model(tmp_path / "hub" / REPO, **SHAPE)
        redis_proc, redis_url = processes.start_redis(tmp_path / "logs")
        hub_proc, hub_url = processes.start_hub(tmp_path / "hub", tmp_path / "logs")
        out = tmp_path / "result.json"
        try:
            subprocess.run(
                [sys.executable, "-m", "bench.download", "--child", redis_url, str(tmp_path), str(out), "--rounds", str(rounds)],
                env={**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf")},
                check=True,
            )
        finally:
            hub_proc.stop()
            redis_proc.stop()
        result = json.loads(out.read_text())
    figs = figures(result)
    table = report(result)
    verdict = (
        f"Target ≤ {TARGET:.2f}×: {'met' if figs[0].met else 'MISSED'} ({figs[0].measured}); "
        f"against the same downloads in the worker's 256 KiB chunks, what the events cost: {figs[1].measured}."
    )
    print(table + "\n\n" + verdict)
    if write:
        write_doc(result, table, rounds, verdict)
    return figs


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    parser.add_argument("--child", nargs=3, metavar=("REDIS_URL", "SCRATCH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        redis_url, scratch, out = args.child
        Path(out).write_text(json.dumps(measure(redis_url, Path(scratch), args.rounds)))
        return []
    return run(args.rounds, not args.no_write)


if __name__ == "__main__":
    main()
