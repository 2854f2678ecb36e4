"""Continuous batching, side by side in one run, with one load generator:

- (a) Hive: one `hive worker` (its default --max-batch) behind `hive serve`;
- (b) `transformers serve --continuous-batching` on the same weights, at the
  transformers version Hive installs, in a virtualenv of its own;
- (c) the in-process static-batch ceiling: N equal prompts decoded together with
  transformers' own DynamicCache, no server.

On a Llama shaped like a 135M-parameter model (random weights; its tokenizer fills
all 49,152 ids, so that every token is text and every system streams one chunk per
token). Waves of N = 1, 4, 8, 16, 32 concurrent streaming requests in two cases,
equal prompts and mixed ones (8–256 prompt tokens, 16–128 max_tokens); then an
open-loop Poisson run at 0.5×, 1× and 1.5× of Hive's measured capacity. Both
servers are driven through their OpenAI `/v1/completions` with `stream: true`.

    python -m bench.batching                       # the whole run (~15 min here)
    python -m bench.batching --n 1,16 --runs 1 --no-poisson --no-write
    python -m bench.batching --model hybrid        # a hybrid (bench/hybrid_batching.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.cluster import one_worker_cluster
from bench.doc import replace_section
from bench.figure import Figure, spread
from bench.http_load import percentile
from tests import processes
from tests.tiny_models import build_model

SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152, shards=2)
MODEL = "bench/llama-135m"
EQUAL_PROMPT_TOKENS, EQUAL_MAX_TOKENS = 16, 32
PEER_VENV = Path(tempfile.gettempdir()) / "hive-bench-peer"


def build(root: Path) -> Path:
    """The 135M-shaped checkpoint under ``root/hub``, its tokenizer filled to the vocab."""
    from transformers import AutoTokenizer

    folder = build_model(root / "hub" / MODEL, **SHAPE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<w{i}>" for i in range(SHAPE["vocab_size"] - len(tokenizer))])
    tokenizer.save_pretrained(folder)
    return folder


def prompts(case: str, n: int, tokenizer, rng: random.Random) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request."""
    words = [f"<w{i}>" for i in range(1000)]

    def prompt(length: int) -> list[int]:
        ids = tokenizer("".join(rng.choice(words) for _ in range(length)), add_special_tokens=False)["input_ids"]
        return ids[:length]

    if case == "equal":
        same = prompt(EQUAL_PROMPT_TOKENS)
        return [(same, EQUAL_MAX_TOKENS)] * n
    return [(prompt(rng.randint(8, 256)), rng.randint(16, 128)) for _ in range(n)]


@dataclass
class Stream:
    sent_at: float
    tokens: list[float] = field(default_factory=list)  # arrival times


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt_ids: list[int], max_tokens: int, tokenizer) -> Stream:
    """A streaming completion; each chunk with text counts as one token (the
    tokenizer makes every id text, so no system holds a token back)."""
    body = {
        "model": model, "prompt": tokenizer.decode(prompt_ids), "max_tokens": max_tokens, "temperature": 0,
        "stream": True,
    }
    stream = Stream(time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                stream.tokens.append(time.perf_counter())
    return stream


def summarise(streams: list[Stream], wall_s: float) -> dict:
    ttft = [s.tokens[0] - s.sent_at for s in streams if s.tokens]
    itl = [b - a for s in streams for a, b in zip(s.tokens, s.tokens[1:])]
    total = sum(len(s.tokens) for s in streams)
    return {
        "tokens_per_s": total / wall_s, "tokens": total,
        "ttft_p50": percentile(ttft, 0.50), "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": percentile(itl, 0.50) if itl else 0.0, "itl_p99": percentile(itl, 0.99) if itl else 0.0,
    }


async def wave(url: str, model: str, requests: list[tuple[list[int], int]], tokenizer) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=600), limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_request(client, url, model, p, m, tokenizer) for p, m in requests))
        return summarise(streams, time.perf_counter() - start)


async def poisson(url: str, model: str, rate: float, seconds: float, tokenizer, seed: int) -> dict:
    """Open loop: arrivals at ``rate`` per second for ``seconds``, mixed requests."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=600), limits=httpx.Limits(max_connections=512)) as client:
        tasks, start = [], time.perf_counter()
        at = 0.0
        while at < seconds:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            (p, m), = prompts("mixed", 1, tokenizer, rng)
            tasks.append(asyncio.create_task(one_request(client, url, model, p, m, tokenizer)))
            at += rng.expovariate(rate)
        streams = await asyncio.gather(*tasks)
        result = summarise(streams, time.perf_counter() - start)
        result["requests"] = len(streams)
        return result


def static_ceiling(folder: Path, n: int, runs: int) -> list[float]:
    """Tokens/s of N equal prompts as one plain static batch, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(1000, 40000, (n, EQUAL_PROMPT_TOKENS))
    rates = []
    for _ in range(runs):
        cache = DynamicCache()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            for _ in range(EQUAL_MAX_TOKENS - 1):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
        rates.append(n * EQUAL_MAX_TOKENS / (time.perf_counter() - start))
    return rates


def peer_python() -> Path:
    """A virtualenv with transformers[serving] at Hive's transformers version."""
    import transformers

    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / f".transformers-{transformers.__version__}"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, f"transformers[serving]=={transformers.__version__}"], check=True)
        marker.touch()
    return python


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric_totals(metrics_url: str) -> dict[str, float]:
    """Each sample name on a worker's /metrics, summed over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def token_path(metrics_url: str) -> tuple[float, float]:
    """(Redis commands the worker's engine sent for tokens, tokens generated), from
    the worker's own /metrics."""
    values = metric_totals(metrics_url)
    return values.get("hive_token_commands_total", 0.0), values.get("hive_generated_tokens_total", 0.0)


def run_system(name, url, model, ns, runs, tokenizer, pid, out: dict, metrics_url: str | None = None) -> None:
    rng = random.Random(0)
    for case in ("equal", "mixed"):
        for n in ns:
            requests = prompts(case, n, tokenizer, rng)
            asyncio.run(wave(url, model, requests[:1], tokenizer))  # warm: the model loaded, the path hot
            before = token_path(metrics_url) if metrics_url else None
            results = [asyncio.run(wave(url, model, requests, tokenizer)) for _ in range(runs)]
            if metrics_url:
                after = token_path(metrics_url)
                out.setdefault("redis_per_token", {})[(case, n)] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            out[(case, n)] = results
            commands = f", {out['redis_per_token'][(case, n)]:.2f} Redis commands a token" if metrics_url else ""
            print(f"{name} {case} N={n}: {statistics.median(r['tokens_per_s'] for r in results):.1f} tok/s, "
                  f"TTFT p50 {statistics.median(r['ttft_p50'] for r in results):.2f} s{commands}", flush=True)
    out["peak_rss_mb"] = peak_rss_mb(pid)


def start_peer(folder: Path, logs: Path, continuous: bool = True) -> tuple[processes.Proc, str]:
    """``transformers serve`` on ``folder``; ``continuous``: with --continuous-batching."""
    port = processes.free_port()
    command = [
        str(peer_python().parent / "transformers"), "serve", str(folder), *(["--continuous-batching"] if continuous else []),
        # Its serve takes "sdpa" and pages it for continuous batching itself (it
        # refuses both "sdpa_paged" and "paged|sdpa").
        "--attn-implementation", "sdpa", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
    ]
    proc = processes.start("transformers-serve", command, logs, env={"HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: httpx.get(f"{url}/v1/models", timeout=2).status_code == 200, 300, "transformers serve", (proc,))
    return proc, url


def ratio_line(hive: dict, peer: dict, ceiling: dict, ns: list[int]) -> tuple[list[str], list[Figure]]:
    lines, figures = [], []
    med = lambda results, key: statistics.median(r[key] for r in results)  # noqa: E731
    for case in ("equal", "mixed"):
        for n in ns:
            h, p = hive[(case, n)], peer[(case, n)]
            ratio = med(h, "tokens_per_s") / med(p, "tokens_per_s")
            ttft_ok = med(h, "ttft_p50") <= med(p, "ttft_p50")
            if n >= 4:
                figures.append(Figure("batching", f"tokens/s Hive / transformers serve, {case}, N={n}", "≥ 1.2×", f"{ratio:.2f}×", ratio >= 1.2))
            figures.append(Figure("batching", f"first token p50 Hive vs transformers serve, {case}, N={n}", "≤",
                                  f"{med(h, 'ttft_p50'):.2f} vs {med(p, 'ttft_p50'):.2f} s", ttft_ok))
    if 16 in ns:
        r = med(hive[("equal", 16)], "tokens_per_s") / statistics.median(ceiling[16])
        figures.append(Figure("batching", "tokens/s Hive / static-batch ceiling, equal, N=16", "≥ 0.85×", f"{r:.2f}×", r >= 0.85))
    if 1 in ns:
        r = med(hive[("equal", 1)], "tokens_per_s") / statistics.median(ceiling[1])
        figures.append(Figure("batching", "one stream: Hive / the plain one-sequence loop (today's worker)", "≥ 0.97×", f"{r:.2f}×", r >= 0.97))
    per_token = hive.get("redis_per_token", {})
    if per_token:
        worst = max(per_token.values())
        figures.append(Figure("batching", "Redis commands per token (the engine's token path, from the worker's /metrics)", "≤ 2", f"{worst:.2f} (worst wave)", worst <= 2))
    for f in figures:
        lines.append(f"- {f.figure}: {f.measured} — target {f.target} {'met' if f.met else 'MISSED'}")
    return lines, figures


def table(name: str, results: dict, ns: list[int]) -> str:
    rows = [f"| {name}, case | N | tokens/s | first token p50 / p99 (s) | inter-token p50 / p99 (ms) |", "| --- | --- | --- | --- | --- |"]
    for case in ("equal", "mixed"):
        for n in ns:
            rs = results[(case, n)]
            rows.append(
                f"| {case} | {n} | {spread([r['tokens_per_s'] for r in rs], '.1f')} | "
                f"{statistics.median(r['ttft_p50'] for r in rs):.2f} / {statistics.median(r['ttft_p99'] for r in rs):.2f} | "
                f"{statistics.median(r['itl_p50'] for r in rs) * 1000:.0f} / {statistics.median(r['itl_p99'] for r in rs) * 1000:.0f} |"
            )
    return "\n".join(rows)


def poisson_table(rows: list[tuple[str, float, float, dict]]) -> str:
    out = ["| system | load | arrivals/s | requests | tokens/s | first token p50 / p99 (s) | inter-token p50 / p99 (ms) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for system, load, rate, r in rows:
        out.append(f"| {system} | {load}× | {rate:.2f} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                   f"{r['itl_p50'] * 1000:.0f} / {r['itl_p99'] * 1000:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama", "hybrid"), default="llama",
                        help="hybrid: a Qwen 3.5-shaped hybrid against its own --max-batch 1 (bench/hybrid_batching.py)")
    parser.add_argument("--n", default=None, help="waves' sizes (default 1,4,8,16,32; 1,4,8,16 for the hybrid)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--poisson-seconds", type=float, default=30.0)
    parser.add_argument("--no-poisson", action="store_true")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve (no ratios)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.model == "hybrid":
        from bench.hybrid_batching import main as hybrid

        args.n = args.n or "1,4,8,16"
        return hybrid(args)
    args.n = args.n or "1,4,8,16,32"
    ns = [int(n) for n in args.n.split(",")]
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hive-bench-batching-") as tmp:
        root = Path(tmp)
        folder = build(root)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ceiling = {n: static_ceiling(folder, n, max(args.runs, 2)) for n in ns}
        for n in ns:
            print(f"static batch N={n}: {statistics.median(ceiling[n]):.1f} tok/s", flush=True)
        hive: dict = {}
        peer: dict = {}
        poisson_rows = []
        metrics_port = processes.free_port()
        with one_worker_cluster(root, "--max-batch", str(max(ns)), "--metrics-port", str(metrics_port)) as cluster:
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            run_system("hive", cluster.url, MODEL, ns, args.runs, tokenizer, cluster.worker.process.pid, hive, metrics_url)
            # Capacity: Hive's mixed-wave rate at its largest N, in requests per second.
            big = max(ns)
            mixed = hive[("mixed", big)]
            per_request = statistics.median(r["tokens"] for r in mixed) / big
            capacity = statistics.median(r["tokens_per_s"] for r in mixed) / per_request
            if not args.no_poisson:
                for load in (0.5, 1.0, 1.5):
                    result = asyncio.run(poisson(cluster.url, MODEL, capacity * load, args.poisson_seconds, tokenizer, seed=1))
                    poisson_rows.append(("Hive", load, capacity * load, result))
                    print(f"hive poisson {load}×: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_p50']:.2f} s", flush=True)
            hive["peak_rss_mb"] = peak_rss_mb(cluster.worker.process.pid)
        if not args.no_peer:
            proc, url = start_peer(folder, root / "logs")
            try:
                run_system("transformers-serve", url, str(folder), ns, args.runs, tokenizer, proc.process.pid, peer)
                if not args.no_poisson:
                    for load in (0.5, 1.0, 1.5):
                        result = asyncio.run(poisson(url, str(folder), capacity * load, args.poisson_seconds, tokenizer, seed=1))
                        poisson_rows.append(("transformers serve", load, capacity * load, result))
                        print(f"serve poisson {load}×: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_p50']:.2f} s", flush=True)
                peer["peak_rss_mb"] = peak_rss_mb(proc.process.pid)
            finally:
                proc.stop()
    lines, figures = ratio_line(hive, peer, ceiling, ns) if peer else ([], [])
    itl = [r for s, load, _, r in poisson_rows if s == "Hive" and load == 1.0]
    if itl:
        ok = itl[0]["itl_p99"] <= 3 * itl[0]["itl_p50"]
        figures.append(Figure("batching", "inter-token p99 / p50, Poisson 1× (jobs keep joining)", "≤ 3×", f"{itl[0]['itl_p99'] / itl[0]['itl_p50']:.2f}×", ok))
        lines.append(f"- {figures[-1].figure}: {figures[-1].measured} — target ≤ 3× {'met' if ok else 'MISSED'}")
    report = "\n\n".join(
        [
            table("Hive", hive, ns),
            table("transformers serve --continuous-batching", peer, ns) if peer else "",
            "| static batch (in process), equal | " + " | ".join(f"N={n}: {spread(ceiling[n], '.1f')}" for n in ns) + " |\n|" + " --- |" * (len(ns) + 1),
            poisson_table(poisson_rows) if poisson_rows else "",
            f"Peak worker memory (RSS): Hive {hive['peak_rss_mb']:.0f} MB" + (f"; transformers serve {peer['peak_rss_mb']:.0f} MB" if peer else ""),
            "\n".join(lines),
        ]
    )
    print(report)
    if not args.no_write:
        write_doc(report, args)
    return figures


def write_doc(report: str, args) -> None:
    replace_section(
        "Continuous batching",
        f"""## Continuous batching

`python -m bench.batching --n {args.n} --runs {args.runs} --poisson-seconds {args.poisson_seconds:g}` on this machine
({os.cpu_count()} cores, no GPU; the hive, redis-server, the worker, transformers serve and the load generator share them),
{time.strftime('%Y-%m-%d')}. A Llama shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 KV heads,
vocab 49,152, fp32, random weights; the tokenizer fills every id, so each token is one streamed chunk on both
servers), greedy. Waves of N requests sent at once (tokens/s: every token over the wave's wall time;
medians of {args.runs} waves with min–max), then open-loop Poisson arrivals of mixed requests at 0.5×, 1× and
1.5× of Hive's measured capacity (its N={args.n.split(',')[-1]} mixed rate, in requests per second), the same
arrival times for both servers. Equal: {EQUAL_PROMPT_TOKENS}-token prompts, {EQUAL_MAX_TOKENS} tokens each.
Mixed: prompts of 8–256 tokens, 16–128 max_tokens.

{report}
""",
    )


if __name__ == "__main__":
    main()
