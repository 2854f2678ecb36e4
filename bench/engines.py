"""Which batching engine: Hive's own (worker/engine/step_loop.py: one packed forward pass per
step over transformers' model classes, worker/engine/batch.py) against transformers' ``ContinuousBatchingManager``
(paged attention over ``attn_implementation="sdpa"``), in one process, on the
same 135M-shaped weights, with N requests of the batching benchmark's two cases.
No Redis and no HTTP: the engines alone.

    python -m bench.engines --n 1,8,16 --runs 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.batching import build, prompts
from bench.doc import replace_section
from bench.figure import Figure, spread


class _Silent:
    """What the engine's metrics and reporters are asked, answered with nothing."""

    def batch_changed(self, *args) -> None: ...
    def admitted(self, job) -> None: ...
    def sent(self, commands) -> None: ...
    def token_commands(self, token) -> list[bytes]:
        return []


def hive_engine(model, tokenizer, requests) -> tuple[float, float]:
    """(tokens/s, median first-token seconds) through worker.engine.step_loop.Engine."""
    from worker.engine.running_job import RunningJob
    from worker.engine.sequence import SamplingParams, Sequence
    from worker.engine.step_loop import Engine

    engine = Engine(model, "bench", None, max(len(requests), 1), lambda: 1 << 40, _Silent())
    jobs = []
    start = time.perf_counter()
    for k, (ids, max_tokens) in enumerate(requests):
        job = RunningJob(str(k), "bench", reporter=_Silent())
        job.sequence = Sequence(model, tokenizer, ids, SamplingParams(max_tokens=max_tokens, temperature=0), frozenset())
        engine.add_job(job)
        jobs.append(job)
    for job in jobs:
        job.done.wait()
    wall = time.perf_counter() - start
    engine.stop()
    return sum(j.tokens for j in jobs) / wall, statistics.median(j.first_at - start for j in jobs)


def divergence(model, tokenizer, requests) -> tuple[int, int, int, int]:
    """Greedy tokens through the engine as one batch against each request alone:
    (sequences identical, sequences, tokens that differ, tokens compared). After a
    first difference a sequence follows another path, so every later token counts."""
    from worker.engine.running_job import RunningJob
    from worker.engine.sequence import SamplingParams, Sequence, generate_alone
    from worker.engine.step_loop import Engine

    params = [SamplingParams(max_tokens=m, temperature=0) for _, m in requests]
    alone = [[step.text for step in generate_alone(model, tokenizer, ids, p)] for (ids, _), p in zip(requests, params)]
    engine = Engine(model, "bench", None, len(requests), lambda: 1 << 40, _Silent())
    jobs = []
    for k, ((ids, _), p) in enumerate(zip(requests, params)):
        job = RunningJob(str(k), "bench", reporter=_Silent())
        job.sequence = Sequence(model, tokenizer, ids, p, frozenset())
        engine.add_job(job)
        jobs.append(job)
    for job in jobs:
        job.done.wait()
    engine.stop()
    same = sum(job.pieces == a for job, a in zip(jobs, alone))
    differ = sum(sum(x != y for x, y in zip(job.pieces, a)) + abs(len(job.pieces) - len(a)) for job, a in zip(jobs, alone))
    return same, len(jobs), differ, sum(len(a) for a in alone)


def transformers_cb(model, requests) -> tuple[float, float]:
    """(tokens/s, median first-token seconds) through ContinuousBatchingManager."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(m for _, m in requests), do_sample=False, eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    start = time.perf_counter()
    ids = [manager.add_request(p, max_new_tokens=m, streaming=True) for p, m in requests]
    left = set(ids)
    while left:
        result = manager.get_result(timeout=1)
        if result is None:
            continue
        first.setdefault(result.request_id, time.perf_counter())
        counts[result.request_id] = len(result.generated_tokens)
        if result.is_finished():
            left.discard(result.request_id)
    wall = time.perf_counter() - start
    manager.stop(block=True)
    model.destroy_cached_continuous_batching_manager() if hasattr(model, "destroy_cached_continuous_batching_manager") else None
    return sum(counts.values()) / wall, statistics.median(t - start for t in first.values())


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1,8,16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hive-bench-engines-") as tmp:
        folder = build(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        # "sdpa": the manager pages it itself (5.24 warns that the "paged|" prefix goes away).
        paged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        rng = random.Random(0)
        loads = [(case, n, prompts(case, n, tokenizer, rng)) for case in ("equal", "mixed") for n in [int(x) for x in args.n.split(",")]]
        # Each engine's runs together: transformers' manager thread is not to
        # overlap Hive's runs (it kept a core busy after stop() in an earlier try).
        hive_engine(ours, tokenizer, loads[0][2][:1])  # warm
        ours_runs = {(case, n): [hive_engine(ours, tokenizer, requests) for _ in range(args.runs)] for case, n, requests in loads}
        transformers_cb(paged, loads[0][2][:1])
        for case, n, requests in loads:
            h, t = ours_runs[(case, n)], [transformers_cb(paged, requests) for _ in range(args.runs)]
            results[(case, n)] = (h, t)
            print(f"{case} N={n}: hive {statistics.median(r[0] for r in h):.1f} tok/s, "
                  f"transformers CB {statistics.median(r[0] for r in t):.1f} tok/s", flush=True)
    # How often a greedy token differs in a batch from the same request alone.
    same, total, differ, compared = divergence(ours, tokenizer, prompts("mixed", 16, tokenizer, random.Random(1)))
    print(f"greedy, batch of 16 mixed vs alone: {same}/{total} sequences identical, {differ}/{compared} tokens differ", flush=True)
    rows = ["| case | N | Hive's engine tokens/s | transformers CB tokens/s | ratio | first token, Hive / CB (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for (case, n), (h, t) in results.items():
        ratio = statistics.median(r[0] for r in h) / statistics.median(r[0] for r in t)
        rows.append(f"| {case} | {n} | {spread([r[0] for r in h], '.1f')} | {spread([r[0] for r in t], '.1f')} | {ratio:.2f}× | "
                    f"{statistics.median(r[1] for r in h):.2f} / {statistics.median(r[1] for r in t):.2f} |")
    table = "\n".join(rows)
    print(table)
    figures = [
        Figure("engines", f"tokens/s Hive's engine / transformers' ContinuousBatchingManager, in process, {case} N={n}", "report",
               f"{statistics.median(r[0] for r in h) / statistics.median(r[0] for r in t):.2f}×", None)
        for (case, n), (h, t) in results.items() if n > 1
    ]
    figures.append(Figure("engines", "greedy tokens that differ in a batch of 16 from alone (random weights)", "report",
                          f"{differ}/{compared} ({100 * differ / compared:.1f}%)", None))
    if not args.no_write:
        replace_section("Batching engine", f"""## Batching engine

`python -m bench.engines --n {args.n} --runs {args.runs}`, {time.strftime('%Y-%m-%d')}, this machine, in one process,
the batching benchmark's 135M-shaped weights and requests (greedy, fp32, CPU): Hive's engine
(`worker/engine/step_loop.py`, packed steps) against transformers' `ContinuousBatchingManager` (`init_continuous_batching`,
paged attention over `attn_implementation="sdpa"`, streaming requests), medians of {args.runs} runs with min–max.

{table}

Greedy output in a batch against the same request alone, on these random weights (16 mixed
requests, one batch): {same} of {total} sequences identical; {differ} of {compared} tokens differ
({100 * differ / compared:.1f}%), counting every token after a sequence's first difference.
Random weights leave near-ties between logits, which a batch's different floating-point sums
(padding, another matmul shape) can tip; on the trained demo model the tests find no difference.
""")
    return figures


if __name__ == "__main__":
    main()
