"""The decode step's attention over the KV cache, layouts side by side in one run
(in process, no server): 30 layers of the 135M-shaped Llama (9 heads, 3 KV heads,
head dim 64, fp32), one query per row, sdpa.

- rectangular: every row as wide as the longest, one batched call (Hive's cache
  before worker/kv/cache.py's pool: it held 2.2× the live tokens);
- gathered blocks: 16-token blocks scattered in a pool, gathered into a staging
  buffer per layer for one batched call (transformers' paged sdpa does this);
- a call per room: each row's contiguous room in the pool, its own call;
- one strided view: rooms at a regular stride read as one view, one call.

    python -m bench.kv_attention
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

LAYERS, HEADS, KV_HEADS, DIM, BLOCK = 30, 9, 3, 64, 16


def timed(step, runs: int = 7) -> float:
    """Median milliseconds of ``step`` (one decode step: every layer)."""
    step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def case(lengths: list[int]) -> dict[str, float]:
    rows, width = len(lengths), max(lengths)
    q = torch.randn(rows, HEADS, 1, DIM)
    rect = torch.randn(rows, KV_HEADS, width, DIM)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    blocks = [-(-n // BLOCK) for n in lengths]
    pool_blocks = torch.randn(sum(blocks) + 1, BLOCK, KV_HEADS, DIM)
    ids = list(range(1, sum(blocks) + 1))
    random.Random(0).shuffle(ids)
    tables, k = [], 0
    for n in blocks:
        tables.append(ids[k : k + n] + [0] * (max(blocks) - n))
        k += n
    table = torch.tensor(tables).flatten()
    staging = torch.empty(rows, max(blocks) * BLOCK, KV_HEADS, DIM)
    gathered_mask = (torch.arange(max(blocks) * BLOCK)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    stride = round(width * 1.06)
    pool = torch.randn(KV_HEADS, stride * rows, DIM)
    starts = [r * stride for r in range(rows)]

    def rectangular():
        for _ in range(LAYERS):
            F.scaled_dot_product_attention(q, rect, rect, attn_mask=mask, enable_gqa=True)

    def gathered():
        for _ in range(LAYERS):
            torch.index_select(pool_blocks, 0, table, out=staging.view(-1, BLOCK, KV_HEADS, DIM))
            k = staging.transpose(1, 2)
            F.scaled_dot_product_attention(q, k, k, attn_mask=gathered_mask, enable_gqa=True)

    def per_room():
        for _ in range(LAYERS):
            for r, (start, n) in enumerate(zip(starts, lengths)):
                view = pool[None, :, start : start + n]
                F.scaled_dot_product_attention(q[r : r + 1], view, view, enable_gqa=True)

    def strided():
        for _ in range(LAYERS):
            view = pool.as_strided((rows, KV_HEADS, width, DIM), (stride * DIM, pool.stride(0), DIM, 1))
            F.scaled_dot_product_attention(q, view, view, attn_mask=mask, enable_gqa=True)

    return {name: timed(step) for name, step in
            (("rectangular", rectangular), ("gathered blocks", gathered), ("a call per room", per_room), ("one strided view", strided))}


def main() -> None:
    rng = random.Random(1)
    print("| rows | tokens a row | rectangular | gathered blocks | a call per room | one strided view |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, lengths, label in ((16, [60] * 16, "60"), (16, [180] * 16, "180"),
                                 (16, [rng.randint(40, 380) for _ in range(16)], "40–380"),
                                 (64, [rng.randint(40, 380) for _ in range(64)], "40–380")):
        ms = case(lengths)
        print(f"| {rows} | {label} | " + " | ".join(f"{ms[k]:.1f} ms" for k in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
