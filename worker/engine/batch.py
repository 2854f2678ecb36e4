"""The running sequences of one model as one batch: one KV cache (worker/engine/kv_cache.py)
and one forward pass per step for all of them, decodes and prefills together
(worker/engine/packed_attention.py).

A sequence holds a ``Row``: its index in the cache, the tokens it has there, and
the token it feeds next. A newcomer's row prefills its prompt in chunks, as many
tokens a step as the scheduler gives it, in the same pass as the running rows'
decode; with its prompt's last chunk it gets its logits, and from the next step
it decodes. A row that ends leaves at once (the last row takes its index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.kv_cache import KVCache, kv_bytes_per_token
from worker.engine.packed_attention import Segment, StepLayout, use_packed_attention


@dataclass(eq=False)
class Row:
    owner: object  # the engine's RunningJob
    prompt_ids: list[int]
    #: The most tokens it can hold: its prompt and max_tokens (its reservation).
    max_length: int
    index: int
    #: Order of arrival in the batch (rows move when others leave).
    joined: int
    #: Tokens in the cache: prompt tokens prefilled so far, then every fed token.
    length: int = 0
    #: The token the next step feeds (the last one sampled); None while prefilling.
    next_id: int | None = None
    #: Steps in a row that gave this prefilling row no chunk (the scheduler's).
    passed_over: int = 0

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.length if self.next_id is None else 0


class Batch:
    def __init__(self, model):
        use_packed_attention(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = KVCache(kv_bytes_per_token(model))
        #: ``rows[i].index == i``.
        self.rows: list[Row] = []
        self._joined = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def owners(self) -> list:
        return [row.owner for row in self.rows]

    @property
    def prefilling(self) -> list[Row]:
        """Rows still prefilling their prompts, oldest first."""
        return sorted((row for row in self.rows if row.next_id is None), key=lambda row: row.joined)

    @property
    def decoding(self) -> int:
        return sum(row.next_id is not None for row in self.rows)

    def reserve(self, count: int, columns: int) -> None:
        """The cache's reservation: ``count`` sequences of up to ``columns`` tokens."""
        used_columns = max((row.length for row in self.rows), default=0)
        self.cache.reserve(count, columns, len(self.rows), used_columns)

    def add(self, owner, prompt_ids: list[int], max_length: int) -> Row:
        """A row for a newcomer (within the reservation); its prompt is prefilled by
        the next steps' ``forward``."""
        assert len(self.rows) < self.cache.rows and max_length <= self.cache.columns
        self._joined += 1
        row = Row(owner, prompt_ids, max_length, len(self.rows), self._joined)
        self.rows.append(row)
        return row

    def remove(self, row: Row) -> None:
        last = self.rows.pop()
        if last is not row:
            self.cache.move(last.index, row.index, last.length)
            last.index = row.index
            self.rows[row.index] = last

    def clear(self) -> None:
        """Every row leaves (the batch failed, or its model is unloaded)."""
        self.rows.clear()

    def feed(self, row: Row, token_id: int) -> None:
        """The token sampled from ``row``'s logits: the next step feeds it."""
        row.next_id = token_id

    @torch.inference_mode()
    def forward(self, chunks: dict[Row, int]) -> tuple[list[Row], torch.Tensor]:
        """One pass: every decoding row's next token, and ``chunks[row]`` more prompt
        tokens of prefilling rows. Returns the rows that have a next-token
        distribution now (the decoding ones, then those whose prompt is complete)
        and their logits [rows, vocab]."""
        decoding = [row for row in self.rows if row.next_id is not None]
        ids = [row.next_id for row in decoding]
        positions = [row.length for row in decoding]
        keep = list(range(len(decoding)))
        ready = list(decoding)
        segments = []
        # Prompts that start now first: packed_attention attends them together.
        for row, n in sorted(chunks.items(), key=lambda item: item[0].length > 0):
            segments.append(Segment(row.index, row.length, n, len(ids)))
            ids.extend(row.prompt_ids[row.length : row.length + n])
            positions.extend(range(row.length, row.length + n))
            if row.length + n == len(row.prompt_ids):
                keep.append(len(ids) - 1)
                ready.append(row)
        layout = StepLayout(self.cache, len(self.rows), [s.index for s in decoding], [s.length for s in decoding],
                            segments, self.device)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            use_cache=False,
            hive_layout=layout,
        )
        for row in decoding:
            row.length += 1
        for row, n in chunks.items():
            row.length += n
        return ready, out.logits[0]
