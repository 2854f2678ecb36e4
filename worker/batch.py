"""The running sequences of one model as one batch: one KV cache (worker/kv_cache.py)
and one forward pass per step for all of them, decodes and prefills together
(worker/packed_attention.py).

A sequence holds a ``Slot``: its row in the cache, the tokens it has there, and the
token it feeds next. A newcomer's slot prefills its prompt in chunks, as many
tokens a step as the scheduler gives it, in the same pass as the running rows'
decode; with its prompt's last chunk it gets its logits, and from the next step
it decodes. A slot that ends leaves at once (the last row takes its place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache, kv_bytes_per_token
from .packed_attention import Segment, StepLayout, use_packed_attention


@dataclass(eq=False)
class Slot:
    owner: object  # the engine's RunningJob
    prompt_ids: list[int]
    #: The most tokens it can hold: its prompt and max_tokens (its reservation).
    max_length: int
    row: int
    #: Order of arrival in the batch (rows move when others leave).
    joined: int
    #: Tokens in the cache: prompt tokens prefilled so far, then every fed token.
    length: int = 0
    #: The token the next step feeds (the last one sampled); None while prefilling.
    next_id: int | None = None
    #: Steps in a row that gave this prefilling slot no chunk (the scheduler's).
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
        #: Slot ``r`` holds row ``r``.
        self.slots: list[Slot] = []
        self._joined = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def owners(self) -> list:
        return [slot.owner for slot in self.slots]

    @property
    def prefilling(self) -> list[Slot]:
        """Slots still prefilling their prompts, oldest first."""
        return sorted((slot for slot in self.slots if slot.next_id is None), key=lambda slot: slot.joined)

    @property
    def decoding(self) -> int:
        return sum(slot.next_id is not None for slot in self.slots)

    def reserve(self, rows: int, columns: int) -> None:
        """The cache's reservation: ``rows`` sequences of up to ``columns`` tokens."""
        used_columns = max((slot.length for slot in self.slots), default=0)
        self.cache.reserve(rows, columns, len(self.slots), used_columns)

    def add(self, owner, prompt_ids: list[int], max_length: int) -> Slot:
        """A row for a newcomer (within the reservation); its prompt is prefilled by
        the next steps' ``forward``."""
        assert len(self.slots) < self.cache.rows and max_length <= self.cache.columns
        self._joined += 1
        slot = Slot(owner, prompt_ids, max_length, len(self.slots), self._joined)
        self.slots.append(slot)
        return slot

    def remove(self, slot: Slot) -> None:
        last = self.slots.pop()
        if last is not slot:
            self.cache.move(last.row, slot.row, last.length)
            last.row = slot.row
            self.slots[slot.row] = last

    def clear(self) -> None:
        """Every slot leaves (the batch failed, or its model is unloaded)."""
        self.slots.clear()

    def feed(self, slot: Slot, token_id: int) -> None:
        """The token sampled from ``slot``'s logits: the next step feeds it."""
        slot.next_id = token_id

    @torch.inference_mode()
    def forward(self, chunks: dict[Slot, int]) -> tuple[list[Slot], torch.Tensor]:
        """One pass: every decoding slot's next token, and ``chunks[slot]`` more prompt
        tokens of prefilling slots. Returns the slots that have a next-token
        distribution now (the decoding ones, then those whose prompt is complete)
        and their logits [slots, vocab]."""
        decoding = [slot for slot in self.slots if slot.next_id is not None]
        ids = [slot.next_id for slot in decoding]
        positions = [slot.length for slot in decoding]
        keep = list(range(len(decoding)))
        ready = list(decoding)
        segments = []
        # Prompts that start now first: packed_attention attends them together.
        for slot, n in sorted(chunks.items(), key=lambda item: item[0].length > 0):
            segments.append(Segment(slot.row, slot.length, n, len(ids)))
            ids.extend(slot.prompt_ids[slot.length : slot.length + n])
            positions.extend(range(slot.length, slot.length + n))
            if slot.length + n == len(slot.prompt_ids):
                keep.append(len(ids) - 1)
                ready.append(slot)
        layout = StepLayout(self.cache, len(self.slots), [s.row for s in decoding], [s.length for s in decoding],
                            segments, self.device)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            use_cache=False,
            hive_layout=layout,
        )
        for slot in decoding:
            slot.length += 1
        for slot, n in chunks.items():
            slot.length += n
        return ready, out.logits[0]
