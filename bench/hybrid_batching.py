"""A hybrid model batches (issue 20), side by side in one run, one load generator:

- Hive: one `hive worker` (its default --max-batch) behind `hive serve`;
- Hive with `--max-batch 1`: the same worker, one job at a time;
- `transformers serve --continuous-batching` on the same weights (the peer of
  bench/batching.py, in its own virtualenv).

On a model shaped like a small Qwen 3.5 (`qwen3_5_text`: 28 layers, three gated
delta net layers to one full-attention layer, hidden 576, about 135M parameters,
random weights, the vocabulary of bench/batching.py). Waves of N = 1, 4, 8, 16
concurrent streaming requests, equal and mixed (bench/batching.py's cases),
through each server's OpenAI `/v1/completions`.

    python -m bench.batching --model hybrid            # ~15 min here
    python -m bench.batching --model hybrid --n 1,16 --runs 1 --no-write
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.batching import EQUAL_MAX_TOKENS, EQUAL_PROMPT_TOKENS, run_system, start_peer
from bench.batching import build as build_llama
from bench.cluster import one_worker_cluster
from bench.doc import replace_section
from bench.figure import Figure, spread

MODEL = "bench/qwen3_5-135m"
#: Qwen 3.5's pattern (three linear-attention layers to one full) at SmolLM2-135M's width.
SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=28, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 7,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
    linear_key_head_dim=64, linear_value_head_dim=64, tie_word_embeddings=True,
)


def build(root: Path) -> Path:
    """The hybrid checkpoint under ``root/hub``, with bench/batching.py's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    llama = build_llama(root / "llama")
    tokenizer = AutoTokenizer.from_pretrained(llama)
    config = AutoConfig.for_model("qwen3_5_text", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = root / "hub" / MODEL
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(args) -> list[Figure]:
    from transformers import AutoTokenizer

    ns = [int(n) for n in args.n.split(",")]
    with tempfile.TemporaryDirectory(prefix="hive-bench-hybrid-") as tmp:
        root = Path(tmp)
        folder = build(root)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        results: dict[str, dict] = {"Hive": {}, "Hive --max-batch 1": {}, "transformers serve --continuous-batching": {}}
        for name, worker_args in (("Hive", ("--max-batch", str(max(ns)))), ("Hive --max-batch 1", ("--max-batch", "1"))):
            with one_worker_cluster(root, *worker_args) as cluster:
                run_system(name, cluster.url, MODEL, ns, args.runs, tokenizer, cluster.worker.process.pid, results[name])
        if not args.no_peer:
            name = "transformers serve --continuous-batching"
            try:
                proc, url = start_peer(folder, root / "logs")
            except RuntimeError as e:  # 5.25's continuous batching refuses linear-attention layers
                refusal = str(e).strip().splitlines()[-1]
                print(f"{name} refuses the model: {refusal}; measuring transformers serve without it", flush=True)
                del results[name]
                name = "transformers serve"
                results[name] = {"refusal": refusal}
                proc, url = start_peer(folder, root / "logs", continuous=False)
            try:
                run_system(name, url, str(folder), ns, args.runs, tokenizer, proc.process.pid, results[name])
            finally:
                proc.stop()
    figures = ratios(results, ns)
    refusals = [f"- transformers serve --continuous-batching refuses the model ({r['refusal']}): measured without it" for r in results.values() if "refusal" in r]
    lines = [f"- {f.figure}: {f.measured} — target {f.target} {'met' if f.met else 'MISSED'}" for f in figures]
    report = "\n\n".join([table(results, ns), "\n".join(refusals + lines)])
    print(report)
    if not args.no_write:
        replace_section(
            "Hybrid models batching",
            f"""## Hybrid models batching

`python -m bench.batching --model hybrid --n {args.n} --runs {args.runs}` on this machine ({os.cpu_count()} cores, no
GPU; the servers and the load generator share them), {time.strftime('%Y-%m-%d')}. A `qwen3_5_text` model shaped like
a small Qwen 3.5 (28 layers: 21 gated delta net layers and 7 full-attention layers, hidden 576, 8 heads and 2 KV
heads of 64, 4 key and 8 value heads of 64 in the linear layers; about 135M parameters, fp32, random weights),
greedy, bench/batching.py's load: waves of N requests sent at once, equal ({EQUAL_PROMPT_TOKENS}-token prompts, {EQUAL_MAX_TOKENS} tokens) and mixed
(8–256 prompt tokens, 16–128 max_tokens); tokens/s: every token over the wave's wall time, medians of {args.runs}
waves with min–max.

{report}
""",
        )
    return figures


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def ratios(results: dict[str, dict], ns: list[int]) -> list[Figure]:
    hive, alone, *peers = results.values()
    peer = peers[0] if peers else {}
    figures = []
    for case in ("equal", "mixed"):
        if 16 in ns:
            r = median(hive[(case, 16)], "tokens_per_s") / median(alone[(case, 16)], "tokens_per_s")
            figures.append(Figure("hybrid", f"hybrid tokens/s Hive / Hive --max-batch 1, {case}, N=16", "≥ 3×", f"{r:.2f}×", r >= 3))
        for n in [n for n in ns if n >= 4 and peer]:
            r = median(hive[(case, n)], "tokens_per_s") / median(peer[(case, n)], "tokens_per_s")
            figures.append(Figure("hybrid", f"hybrid tokens/s Hive / transformers serve, {case}, N={n}", "≥ 1.2×", f"{r:.2f}×", r >= 1.2))
    return figures


def table(results: dict[str, dict], ns: list[int]) -> str:
    rows = ["| system | case | N | tokens/s | first token p50 (s) |", "| --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        for case in ("equal", "mixed"):
            for n in ns:
                if (case, n) in result:
                    rs = result[(case, n)]
                    rows.append(f"| {name} | {case} | {n} | {spread([r['tokens_per_s'] for r in rs], '.1f')} | {median(rs, 'ttft_p50'):.2f} |")
    return "\n".join(rows)
