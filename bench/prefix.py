"""Prefix caching, side by side in one run: Hive with its prefix cache (the default),
Hive with ``--no-prefix-cache``, and ``transformers serve --continuous-batching``
(which shares blocks) on the same 135M-shaped Llama as bench/batching.py.

Loads, each sent as streaming ``/v1/completions`` with temperature 0:

- shared: G groups of M requests; each group's requests share a system prompt of
  ``--system`` tokens and each has its own question of ``--question`` tokens,
  ``--out`` tokens out (SGLang's generated-shared-prefix benchmark, scaled to this
  CPU). One request per group goes first, so each prompt has been seen; then all
  G × M go at once.
- unshared: the same questions without the system prompts: the limit reuse can
  reach, and the 0%-hit case.
- multi-turn: C conversations of R rounds, concurrently; each round's prompt is the
  conversation so far (earlier questions and answers) and a new question.

Hit rate: the worker's ``hive_prefix_cache_hits_total`` over the tokens an ideal
cache would find (each prompt's longest prefix shared with an earlier request, in
whole 16-token blocks, never its last token).

    python -m bench.prefix                      # ~6 min here
    python -m bench.prefix --groups 2 --per-group 4 --no-peer --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.batching import MODEL, Stream, build, metric_totals, one_request, start_peer, summarise
from bench.cluster import one_worker_cluster
from bench.doc import replace_section
from bench.figure import Figure, spread
from tests import processes

BLOCK = 16


def words(tokenizer, rng: random.Random, n: int) -> list[int]:
    ids = tokenizer("".join(f"<w{rng.randrange(1000, 40000)}>" for _ in range(n)), add_special_tokens=False)["input_ids"]
    return ids[:n]


def shared_load(tokenizer, args, with_system: bool) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(the warm-up requests, one per group; each run's wave): prompt ids. Every
    request has a question of its own, so unshared prompts find nothing."""
    rng = random.Random(7)
    systems = [words(tokenizer, rng, args.system) for _ in range(args.groups)]
    prompt = (lambda g: systems[g] + words(tokenizer, rng, args.question)) if with_system else (lambda g: words(tokenizer, rng, args.question))
    warm = [prompt(g) for g in range(args.groups)]
    waves = [[prompt(g) for g in range(args.groups) for _ in range(args.per_group)] for _ in range(args.runs)]
    return warm, waves


def ideal_hits(prompts: list[list[int]]) -> int:
    """Tokens an ideal block cache finds, each prompt against those sent before it."""
    total = 0
    for k, prompt in enumerate(prompts):
        best = 0
        for earlier in prompts[:k]:
            n = 0
            while n < min(len(prompt), len(earlier)) and prompt[n] == earlier[n]:
                n += 1
            best = max(best, n)
        total += min(best // BLOCK * BLOCK, len(prompt) - 1)
    return total


def prefix_counters(metrics_url: str | None) -> tuple[float, float]:
    if metrics_url is None:
        return 0.0, 0.0
    values = metric_totals(metrics_url)
    return values.get("hive_prefix_cache_hits_total", 0.0), values.get("hive_prefix_cache_queries_total", 0.0)


async def send(url: str, model: str, prompts: list[list[int]], out: int, tokenizer) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=900), limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_request(client, url, model, p, out, tokenizer) for p in prompts))
        return summarise(streams, time.perf_counter() - start)


async def conversations(url: str, model: str, tokenizer, args) -> dict:
    """C conversations of R rounds at once; each round sends the whole history."""
    rng = random.Random(11)
    streams: list[Stream] = []
    sent: list[list[int]] = []

    async def conversation(client: httpx.AsyncClient) -> None:
        history = words(tokenizer, rng, args.system // 2)
        for _ in range(args.rounds):
            history = history + words(tokenizer, rng, args.question // 2)
            sent.append(history)
            body = {"model": model, "prompt": tokenizer.decode(history), "max_tokens": args.out // 2, "temperature": 0}
            stream = Stream(time.perf_counter())
            response = await client.post(f"{url}/v1/completions", json={**body, "stream": False})
            stream.tokens.append(time.perf_counter())  # one-shot: the round's whole time, for the tokens/s
            streams.append(stream)
            answer = response.json()["choices"][0]["text"]
            history = history + tokenizer(answer, add_special_tokens=False)["input_ids"]

    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=900)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(client) for _ in range(args.conversations)))
        wall = time.perf_counter() - start
    rounds = [s.tokens[0] - s.sent_at for s in streams]
    return {"round_p50": statistics.median(rounds), "round_max": max(rounds), "wall_s": wall, "prompts": sent}


def kv_ratio(folder: Path, streams: int, tokenizer) -> list[tuple[float, float]]:
    """What the rows hold of the KV cache, and the whole pool, each ÷ what their live
    tokens hold, at every step of ``streams`` mixed requests (prompts of 8–256 tokens,
    16–128 out, all at once) run by the worker's own Scheduler and Batch in this
    process, greedy, without Redis."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine.batch import Batch
    from worker.engine.scheduler import Scheduler
    from worker.engine.self_check import batch_path

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = Batch(model, batch_path(model), prefix_seed="bench")
    scheduler = Scheduler(streams, 64, lambda: 1 << 40)
    rng = random.Random(13)
    for _ in range(streams):
        prompt, out = words(tokenizer, rng, rng.randint(8, 256)), rng.randint(16, 128)
        sequence = SimpleNamespace(prompt_ids=prompt, max_length=len(prompt) + out, max_tokens=out)
        scheduler.waiting.append(SimpleNamespace(sequence=sequence, cache_salt="k", row=None, resume=None, phase=""))
    ratios = []
    with torch.inference_mode():
        while scheduler.waiting or batch.rows:
            _, chunks = scheduler.plan(batch)
            ready, logits = batch.forward(chunks)
            if batch.used_bytes:
                ratios.append((batch.held_bytes / batch.used_bytes, batch.cache.allocated_bytes / batch.used_bytes))
            for row, token in zip(ready, logits.argmax(-1).tolist()):
                job = row.owner
                job.sequence.max_tokens -= 1
                if job.sequence.max_tokens == 0:
                    batch.remove(row)
                else:
                    batch.feed(row, token)
            scheduler.shrink(batch)
    return ratios


def run_system(name: str, url: str, model: str, tokenizer, args, metrics_url: str | None) -> dict:
    out: dict = {}
    for load, with_system in (("shared", True), ("unshared", False)):
        warm, waves = shared_load(tokenizer, args, with_system)
        asyncio.run(send(url, model, warm, 4, tokenizer))  # the model warm; each system prompt seen once
        runs = []
        for run, wave in enumerate(waves):
            hits0, queries0 = prefix_counters(metrics_url)
            result = asyncio.run(send(url, model, wave, args.out, tokenizer))
            hits1, queries1 = prefix_counters(metrics_url)
            before = [p for w in waves[:run] for p in w]
            ideal = ideal_hits(warm + before + wave) - ideal_hits(warm + before)
            result["hit_rate"] = (hits1 - hits0) / ideal if ideal and metrics_url else None
            result["hits"], result["queries"] = hits1 - hits0, queries1 - queries0
            runs.append(result)
            print(f"{name} {load} run {run}: {result['tokens_per_s']:.1f} tok/s, first token p50 {result['ttft_p50']:.2f} s, "
                  f"p99 {result['ttft_p99']:.2f} s" + (f", hits {result['hits']:.0f} of ideal {ideal}" if metrics_url else ""), flush=True)
        out[load] = runs
    hits0, _ = prefix_counters(metrics_url)
    talk = asyncio.run(conversations(url, model, tokenizer, args))
    hits1, _ = prefix_counters(metrics_url)
    ideal = ideal_hits(talk.pop("prompts"))
    talk["hit_rate"] = (hits1 - hits0) / ideal if ideal and metrics_url else None
    out["multi-turn"] = talk
    print(f"{name} multi-turn: round p50 {talk['round_p50']:.2f} s, all {talk['wall_s']:.1f} s", flush=True)
    return out


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, dict]) -> tuple[str, list[Figure]]:
    rows = ["| system | load | first token p50 | p99 | tokens/s | hit rate ÷ ideal |", "| --- | --- | --- | --- | --- | --- |"]
    for name, out in results.items():
        for load in ("shared", "unshared"):
            runs = out[load]
            rate = [r["hit_rate"] for r in runs if r["hit_rate"] is not None]
            rows.append(f"| {name} | {load} | {spread([r['ttft_p50'] for r in runs], '.2f')} s | {spread([r['ttft_p99'] for r in runs], '.2f')} s "
                        f"| {spread([r['tokens_per_s'] for r in runs], '.1f')} | {spread(rate, '.0%') if rate else '–'} |")
    rows.append("")
    rows.append("| system | multi-turn: round p50 | slowest round | all rounds | hit rate ÷ ideal |")
    rows.append("| --- | --- | --- | --- | --- |")
    for name, out in results.items():
        t = out["multi-turn"]
        rows.append(f"| {name} | {t['round_p50']:.2f} s | {t['round_max']:.2f} s | {t['wall_s']:.1f} s | {t['hit_rate']:.0%} |"
                    if t["hit_rate"] is not None else f"| {name} | {t['round_p50']:.2f} s | {t['round_max']:.2f} s | {t['wall_s']:.1f} s | – |")
    on, off, peer = results.get("Hive"), results.get("Hive, cache off"), results.get("transformers serve")
    figures: list[Figure] = []
    if on and off:
        ttft = med(on["shared"], "ttft_p50") / med(on["unshared"], "ttft_p50")
        figures.append(Figure("prefix", "shared-prefix first token p50 ÷ the same questions' without the prompt", "≤ 3×", f"{ttft:.2f}×", ttft <= 3))
        speed = med(on["shared"], "tokens_per_s") / med(off["shared"], "tokens_per_s")
        figures.append(Figure("prefix", "shared-prefix tokens/s, cache on ÷ off", "≥ 3×", f"{speed:.2f}×", speed >= 3))
        rate = statistics.median(r["hit_rate"] for r in on["shared"])
        figures.append(Figure("prefix", "shared-prefix hit rate ÷ the ideal", "≥ 95%", f"{rate:.0%}", rate >= 0.95))
        zero = med(on["unshared"], "tokens_per_s") / med(off["unshared"], "tokens_per_s")
        figures.append(Figure("prefix", "unshared tokens/s, cache on ÷ off (no prefix to find but the questions')", "≥ 0.98×", f"{zero:.2f}×", zero >= 0.98))
    if on and peer:
        vs = med(on["shared"], "tokens_per_s") / med(peer["shared"], "tokens_per_s")
        figures.append(Figure("prefix", "shared-prefix tokens/s, Hive ÷ transformers serve", "≥ 1.5×", f"{vs:.2f}×", vs >= 1.5))
    lines = [f"- {f.figure}: {f.measured} — target {f.target} {'met' if f.met else 'MISSED'}" for f in figures]
    return "\n".join(rows) + "\n\n" + "\n".join(lines), figures


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--system", type=int, default=512, help="system prompt tokens")
    parser.add_argument("--question", type=int, default=64, help="question tokens")
    parser.add_argument("--out", type=int, default=32, help="tokens out")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-kv-ratio", action="store_true", help="skip the in-process memory figure")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hive-bench-prefix-") as tmp:
        root = Path(tmp)
        folder = build(root)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ratios = [] if args.no_kv_ratio else kv_ratio(folder, args.groups * args.per_group, tokenizer)
        batch = str(args.groups * args.per_group)
        for name, extra in (("Hive", ()), ("Hive, cache off", ("--no-prefix-cache",))):
            metrics_port = processes.free_port()
            with one_worker_cluster(root, "--max-batch", batch, "--metrics-port", str(metrics_port), *extra) as cluster:
                metrics = f"http://127.0.0.1:{metrics_port}/metrics" if not extra else None
                results[name] = run_system(name, cluster.url, MODEL, tokenizer, args, metrics)
        if not args.no_peer:
            proc, url = start_peer(folder, root / "logs")
            try:
                results["transformers serve"] = run_system("transformers serve", url, str(folder), tokenizer, args, None)
            finally:
                proc.stop()
    text, figures = report(results)
    if ratios:
        held, pool = (sorted(r[k] for r in ratios) for k in (0, 1))
        text += (f"\n\nKV cache ÷ what live tokens hold, at each of {len(ratios)} steps of {args.groups * args.per_group} mixed "
                 f"streams (prompts 8–256 tokens, 16–128 out; `kv_ratio`, in process): the rows' rooms median "
                 f"{statistics.median(held):.2f}×, max {held[-1]:.2f}× (target ≤ 1.15× at every step); the whole pool "
                 f"(reserved ahead, given back past 2×) median {statistics.median(pool):.2f}×, max {pool[-1]:.2f}×.")
        figures.append(Figure("prefix", "KV held by rows ÷ used, every step of 16 mixed streams (max)", "≤ 1.15×", f"{held[-1]:.2f}×", held[-1] <= 1.15))
    print(text)
    if not args.no_write:
        command = " ".join(["python -m bench.prefix", *(argv if argv is not None else [])])
        replace_section(
            "Prefix caching",
            f"""## Prefix caching

`{command.strip()}` on this machine ({os.cpu_count()} cores, no GPU; every process shares them), {time.strftime('%Y-%m-%d')}.
The 135M-shaped Llama of bench/batching.py (fp32, random weights), greedy, streaming `/v1/completions`.
Shared: {args.groups} groups × {args.per_group} requests, a {args.system}-token system prompt per group, a {args.question}-token
question each, {args.out} tokens out; one request per group first, then all {args.groups * args.per_group} at once
(medians of {args.runs} waves, min–max). Unshared: the same questions alone. Multi-turn: {args.conversations} conversations
of {args.rounds} rounds at once, each round the whole history and a new {args.question // 2}-token question, {args.out // 2} tokens out.

{text}
""",
        )
    return figures


if __name__ == "__main__":
    main()
