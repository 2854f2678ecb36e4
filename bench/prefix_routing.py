"""Cache-aware routing, side by side in one run: one hive and two workers (real
processes, each with its prefix cache), first with the hive routing by prefix
(shared/prefix_affinity.py, the default), then with ``--no-prefix-routing`` (the
warm routing Hive had before: the idle worker with the most free slots).

The load: G groups, each with its own system prompt of ``--system`` tokens; requests
with a ``--question``-token question each arrive open loop (Poisson, ``--rate`` a
second), groups interleaved, ``--out`` tokens out, streamed through
``/v1/completions``. Hit rate: both workers' ``hive_prefix_cache_hits_total`` over
what one ideal cache would find (bench/prefix.py's ``ideal_hits``).

    python -m bench.prefix_routing                 # ~8 min here
    python -m bench.prefix_routing --requests 16 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.batching import MODEL, build, one_request, summarise
from bench.doc import replace_section
from bench.figure import Figure
from bench.prefix import ideal_hits, prefix_counters, words
from tests import processes


@contextlib.contextmanager
def two_workers(root: Path, routing: bool, batch: int, cache_memory: str) -> Iterator[tuple[str, list[str]]]:
    """(the hive's URL, the workers' metrics URLs), every process stopped on leaving."""
    logs = root / f"logs-{routing}"
    logs.mkdir(exist_ok=True)
    procs = []
    try:
        redis_proc, redis_url = processes.start_redis(logs)
        procs.append(redis_proc)
        hub_proc, hub_url = processes.start_hub(root / "hub", logs)
        procs.append(hub_proc)
        port = processes.free_port()
        url = f"http://127.0.0.1:{port}"
        hive_args = ("serve", "--redis-url", redis_url, "--port", str(port), "--log-level", "warning")
        procs.append(processes.start("hive", processes.hive_command(*hive_args, *(() if routing else ("--no-prefix-routing",))), logs))
        metrics = []
        for n in range(2):
            metrics_port = processes.free_port()
            metrics.append(f"http://127.0.0.1:{metrics_port}/metrics")
            procs.append(processes.start(
                f"worker-{n}",
                processes.hive_command("worker", "--redis-url", redis_url, "--device", "cpu", "--log-level", "warning",
                                       "--max-batch", str(batch), "--metrics-port", str(metrics_port), "--name", f"w{n}",
                                       "--prefix-cache-memory", cache_memory),
                logs,
                env={"HF_ENDPOINT": hub_url, "HF_HOME": str(root / "hf")},
            ))
        processes.wait_until(lambda: processes.health(url).get("workers", 0) == 2, 300, "hive and two workers", tuple(procs))
        yield url, metrics
    finally:
        for proc in reversed(procs):
            proc.stop()


async def open_loop(url: str, prompts: list[list[int]], rate: float, out: int, tokenizer) -> dict:
    rng = random.Random(5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=900), limits=httpx.Limits(max_connections=256)) as client:
        tasks, start, at = [], time.perf_counter(), 0.0
        for prompt in prompts:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, url, MODEL, prompt, out, tokenizer)))
            at += rng.expovariate(rate)
        streams = await asyncio.gather(*tasks)
        return summarise(streams, time.perf_counter() - start)


def run(root: Path, routing: bool, tokenizer, args) -> dict:
    rng = random.Random(3)
    systems = [words(tokenizer, rng, args.system) for _ in range(args.groups)]
    prompts = [systems[k % args.groups] + words(tokenizer, rng, args.question) for k in range(args.requests)]
    with two_workers(root, routing, args.batch, args.cache_memory) as (url, metrics):
        # Both workers warm (a cold worker is never routed to while a warm one has a
        # free slot): bursts of requests unrelated to the groups until both hold the model.
        for _ in range(10):
            asyncio.run(open_loop(url, [words(tokenizer, rng, 16) for _ in range(3 * args.batch)], 1000.0, 32, tokenizer))
            held = [w for w in httpx.get(f"{url}/v1/workers", timeout=5).json()["workers"] if any(m["model"] == MODEL for m in w["models"])]
            if len(held) == 2:
                break
        else:
            raise RuntimeError("the second worker never loaded the model")
        before = [prefix_counters(m)[0] for m in metrics]
        result = asyncio.run(open_loop(url, prompts, args.rate, args.out, tokenizer))
        after = [prefix_counters(m)[0] for m in metrics]
    result["hit_rate"] = sum(after) - sum(before)
    result["hit_rate"] /= ideal_hits(prompts)
    name = "prefix routing" if routing else "warm routing only"
    print(f"{name}: {result['tokens_per_s']:.1f} tok/s, first token p50 {result['ttft_p50']:.2f} s, "
          f"p99 {result['ttft_p99']:.2f} s, hit rate {result['hit_rate']:.0%} of ideal", flush=True)
    return result


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system", type=int, default=512)
    parser.add_argument("--question", type=int, default=64)
    parser.add_argument("--out", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.3, help="arrivals a second (0.5 overloads this CPU: every job then queues, and no routing can choose)")
    parser.add_argument("--batch", type=int, default=8, help="each worker's --max-batch")
    parser.add_argument("--cache-memory", default="128MiB",
                        help="each worker's --prefix-cache-memory: about five of the eight groups' prompts, so that no worker holds them all")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hive-bench-routing-") as tmp:
        root = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(build(root))
        on, off = run(root, True, tokenizer, args), run(root, False, tokenizer, args)
    hits = on["hit_rate"] / off["hit_rate"] if off["hit_rate"] else float("inf")
    speed = on["tokens_per_s"] / off["tokens_per_s"]
    figures = [
        Figure("prefix-routing", "hit rate, prefix routing ÷ warm routing only (two workers)", "≥ 3×", f"{hits:.2f}×", hits >= 3),
        Figure("prefix-routing", "tokens/s, prefix routing ÷ warm routing only", "≥ 1.5×", f"{speed:.2f}×", speed >= 1.5),
        Figure("prefix-routing", "first token p99, prefix routing ÷ warm routing only", "≤ 1×",
               f"{on['ttft_p99'] / off['ttft_p99']:.2f}×", on["ttft_p99"] <= off["ttft_p99"]),
    ]
    rows = ["| routing | tokens/s | first token p50 | p99 | hit rate ÷ ideal |", "| --- | --- | --- | --- | --- |"]
    for name, r in (("prefix routing (default)", on), ("warm routing only (`--no-prefix-routing`)", off)):
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} s | {r['ttft_p99']:.2f} s | {r['hit_rate']:.0%} |")
    lines = [f"- {f.figure}: {f.measured} — target {f.target} {'met' if f.met else 'MISSED'}" for f in figures]
    text = "\n".join(rows) + "\n\n" + "\n".join(lines)
    print(text)
    if not args.no_write:
        command = " ".join(["python -m bench.prefix_routing", *(argv if argv is not None else [])]).strip()
        replace_section(
            "Cache-aware routing",
            f"""## Cache-aware routing

`{command}` on this machine ({os.cpu_count()} cores, no GPU; both workers, the hive, redis-server and the load share them),
{time.strftime('%Y-%m-%d')}. One hive, two workers (`--max-batch {args.batch}` each, prefix cache on, `--prefix-cache-memory {args.cache_memory}`:
about five of the eight groups' prompts, so that neither worker holds them all), the 135M-shaped Llama of bench/batching.py. {args.requests} streaming requests arriving open loop ({args.rate:g} a second, Poisson), {args.groups} groups
interleaved, each group a {args.system}-token system prompt, each request its own {args.question}-token question, {args.out} tokens out.
One run each (single figures, not medians).

{text}
""",
        )
    return figures


if __name__ == "__main__":
    main()
