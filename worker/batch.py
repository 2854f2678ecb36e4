"""The running sequences of one model as one batch: one KV cache, one forward pass
per decode step for all of them.

Sequences of different lengths share the cache left-padded: row ``r`` holds its
tokens at the right end of the time axis, and the attention mask hides the pads.
A newcomer's prompt is prefilled on its own (alone, or with the other newcomers of
that step, left-padded among themselves), then its cache rows are joined to the
batch's, padded to the batch's length; a sequence that ends leaves with its rows
(``filter``), and columns that only pads still use are dropped. This is the
technique of text-generation-inference's ``CausalLMBatch`` (concatenate / filter),
over transformers' own model classes, so it works for any causal LM that takes an
attention mask, position ids and a cache: paged attention (vLLM, transformers'
continuous batching) needs kernels per architecture that the CPU path lacks, and
docs/benchmarks.md measures the two.

Hand-written rather than transformers' ``DynamicCache``: its layers concatenate on
every step (the whole batch's cache copied per token); ``GrowingLayer`` writes in
place into spare room and grows by SPARE_COLUMNS at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


#: Spare room on the time axis of each layer's buffers: a decode step writes one
#: column in place, and the buffers are copied (grown) once every this many steps.
SPARE_COLUMNS = 64


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with spare room
    on the time axis, so a decode step writes one column instead of copying all."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = self._values = None

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE_COLUMNS) -> None:
        """Replaces the contents (after a join or a filter), with ``spare`` columns of room."""
        b, h, t, d = keys.shape
        self._keys = keys.new_empty((b, h, t + spare, d))
        self._values = values.new_empty((b, h, t + spare, values.shape[-1]))
        self._keys[:, :, :t] = keys
        self._values[:, :, :t] = values
        self.length = t
        self._view()
        self.is_initialized = True
        self.device = keys.device

    def _view(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._keys is None:
            self.set(key_states, value_states)
            return self.keys, self.values
        if self.length + n > self._keys.shape[-2]:
            keys, values = self.keys, self.values
            self.set(keys, values, spare=max(n, SPARE_COLUMNS))
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    @property
    def nbytes(self) -> int:
        if not self.is_initialized or self._keys is None:
            return 0
        return self._keys.numel() * self._keys.element_size() + self._values.numel() * self._values.element_size()


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=GrowingLayer)


@dataclass
class Prefilled:
    """Newcomers' prompts after their forward pass: their own cache rows, ready to
    join a batch, and the logits of each one's last position."""

    cache: Cache
    mask: torch.Tensor  # [n, T] 1 for tokens, 0 for pads
    logits: torch.Tensor  # [n, vocab]


class PromptChunks:
    """A prompt prefilled in chunks of at most ``chunk`` tokens, one chunk per engine
    step, so a long prompt does not freeze the running streams for its whole length
    (chunked prefill)."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.done = 0
        self.cache = new_cache()

    @property
    def left(self) -> int:
        return len(self.prompt_ids) - self.done


class DecodeBatch:
    """The batch of one model. Rows are in the order of ``rows`` (the caller's
    objects, one per sequence); ``positions[r]`` is the number of tokens row ``r``
    has in the cache, so its next token's position."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.rows: list = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.next_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_bytes(self) -> int:
        """What the cache's buffers take, spare room included."""
        if self.cache is None:
            return 0
        return sum(layer.nbytes for layer in self.cache.layers)

    @property
    def width(self) -> int:
        """Columns of the cache (the longest row plus the pads of the others)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> Prefilled:
        """Prefills whole prompts together, left-padded to the longest."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = torch.tensor(prompt)
            mask[r, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        # A mask of all ones is the same as none, and none takes the faster path.
        logits = self._forward(ids, None if bool(mask.all()) else mask, positions, cache)
        return Prefilled(cache, mask, logits)

    @torch.inference_mode()
    def prefill_chunk(self, chunks: PromptChunks, size: int) -> Prefilled | None:
        """The next chunk of a long prompt; the Prefilled once its last chunk is in."""
        part = chunks.prompt_ids[chunks.done : chunks.done + size]
        ids = torch.tensor([part], device=self.device)
        positions = torch.arange(chunks.done, chunks.done + len(part), device=self.device).unsqueeze(0)
        logits = self._forward(ids, None, positions, chunks.cache)
        chunks.done += len(part)
        if chunks.left:
            return None
        mask = torch.ones((1, chunks.done), dtype=torch.long, device=self.device)
        return Prefilled(chunks.cache, mask, logits)

    def join(self, rows: list, prefilled: Prefilled, first_ids: list[int]) -> None:
        """Adds prefilled sequences to the batch; ``first_ids``: the token each sampled
        from its prompt, which the next decode step feeds."""
        new_ids = torch.tensor(first_ids, dtype=torch.long, device=self.device)
        new_positions = prefilled.mask.sum(-1)
        if self.cache is None:
            self.cache, self.mask, self.positions, self.next_ids = prefilled.cache, prefilled.mask, new_positions, new_ids
            self.rows = list(rows)
            return
        width = max(self.width, prefilled.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, prefilled.cache.layers):
            keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            mine.set(keys, values)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(prefilled.mask, width)])
        self.positions = torch.cat([self.positions, new_positions])
        self.next_ids = torch.cat([self.next_ids, new_ids])
        self.rows.extend(rows)

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One step for every row: feeds each row's last token; returns [rows, vocab]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        mask = None if len(self.rows) == 1 or bool(self.mask[:, 0].all()) else self.mask
        logits = self._forward(self.next_ids.unsqueeze(1), mask, self.positions.unsqueeze(1), self.cache)
        self.positions = self.positions + 1
        return logits

    def feed(self, token_ids: list[int]) -> None:
        """The tokens sampled from the last step, one per row, for the next step."""
        self.next_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)

    def filter(self, keep: list[int]) -> None:
        """Keeps only the rows at ``keep`` (in that order), and drops the columns
        that are pads in every row left."""
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.next_ids = [], None, None, None, None
            return
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.set(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
        self.positions = self.positions.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pads dim 2 (a cache's time axis) or dim 1 (a mask's) on the left with zeros to ``width``."""
    axis = 2 if t.dim() == 4 else 1
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)
