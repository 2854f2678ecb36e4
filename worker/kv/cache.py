"""The KV cache of one model's batch: per layer, one keys and one values buffer of
shape [rows, kv heads, columns, head dim], one row per sequence.

Rows are right-padded and compact: row ``r`` holds its sequence's tokens from
column 0, and the live rows are always ``0 .. len - 1`` (a row that leaves is
filled by the last one), so a decode step attends over one contiguous slice of
the buffers whatever the mix of lengths. A newcomer's prompt is written into its
own row chunk by chunk as it is prefilled: nothing is concatenated or padded
when a sequence joins, and one that leaves costs one row's copy, unlike a
left-padded cache (the technique of TGI's ``CausalLMBatch``, which Hive used
before: docs/benchmarks.md measures the two).

The buffers are allocated once to the batch's reservation (its rows, each as
wide as the longest ``prompt + max_tokens`` among them), so a decode step never
grows them and the scheduler's memory budget counts exactly what is allocated.
They are reallocated (one copy of what is used) only when a job needs more rows
or columns than reserved, or when the batch has shrunk to under half of it.

A hybrid model's rows hold a recurrent state beside their keys and values
(worker/engine/recurrent_state.py): the reservation counts it per row
(``bytes_per_row``), so the memory budget holds for hybrids too.
"""

from __future__ import annotations

import torch

from worker.engine.recurrent_state import ATTENTION_FREE_TYPES, layer_types, text_config

#: Columns are reserved in multiples of this, so jobs of similar lengths share one
#: reservation instead of reallocating the buffers for a few more columns.
COLUMN_STEP = 64


def round_columns(tokens: int) -> int:
    return -(-tokens // COLUMN_STEP) * COLUMN_STEP


def kv_bytes_per_token(model) -> int:
    """Keys and values of one token in every layer, from the model's config and dtype:
    layer by layer where the config differs per layer (Gemma 4's head dims), where
    reading ``config.head_dim`` raises."""
    config = text_config(model)
    if getattr(config, "is_heterogeneous", False):
        layers = list(config.per_layer_config)
    else:
        layers = [config] * config.num_hidden_layers
    # A hybrid's linear-attention and state-space layers keep no keys and values.
    kinds = layer_types(model) or ["full_attention"] * len(layers)
    itemsize = next(model.parameters()).element_size()
    return itemsize * sum(_kv_width(layer) for layer, kind in zip(layers, kinds) if kind not in ATTENTION_FREE_TYPES)


def _kv_width(config) -> int:
    """One layer's key and value widths per token: KV heads × (key dim + value dim).
    Multi-head latent attention (DeepSeek V3, GLM-4 MoE Lite) keeps keys of
    ``qk_nope_head_dim + qk_rope_head_dim`` and values of ``v_head_dim`` per head."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    key_dim = getattr(config, "qk_head_dim", None) or head_dim
    value_dim = getattr(config, "v_head_dim", None) or head_dim
    return kv_heads * (key_dim + value_dim)


class KVCache:
    def __init__(self, bytes_per_token: int, bytes_per_row: int = 0):
        """``bytes_per_row``: what each row holds besides its tokens' keys and values (a
        hybrid's recurrent state, kept beside this cache)."""
        self.bytes_per_token = bytes_per_token
        self.bytes_per_row = bytes_per_row
        #: Per layer (by the attention module's ``layer_idx``): keys and values
        #: buffers, allocated at the layer's first write, or None.
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.rows = 0  # reserved
        self.columns = 0  # reserved

    def reserved_bytes(self, rows: int | None = None, columns: int | None = None) -> int:
        """Bytes of a reservation of ``rows`` × ``columns`` (by default the current one)."""
        rows = self.rows if rows is None else rows
        columns = self.columns if columns is None else columns
        return rows * (columns * self.bytes_per_token + self.bytes_per_row)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    @torch.inference_mode()
    def reserve(self, rows: int, columns: int, used_rows: int, used_columns: int) -> None:
        """Makes the reservation ``rows`` × ``columns`` (rounded up to COLUMN_STEP),
        keeping the first ``used_rows`` rows' first ``used_columns`` columns; the
        caller checked it against the memory budget."""
        columns = round_columns(columns)
        if (rows, columns) == (self.rows, self.columns):
            return
        assert rows >= used_rows and columns >= used_columns
        self.rows, self.columns = rows, columns
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                if old is None:
                    continue
                if not rows:
                    buffers[i] = None
                    continue
                new = old.new_zeros((rows, old.shape[1], columns, old.shape[3]))
                new[:used_rows, :, :used_columns] = old[:used_rows, :, :used_columns]
                buffers[i] = new

    def layer(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values buffers, allocated on first use after the
        layer's new keys and values ([1, kv heads, tokens, dim]; MLA's differ in dim)."""
        while len(self.keys) <= index:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[index] is None:
            # Zeros, not garbage: a masked column still meets a zero probability in
            # attention's sums, and 0 × NaN would be NaN.
            self.keys[index] = key.new_zeros((self.rows, key.shape[1], self.columns, key.shape[3]))
            self.values[index] = value.new_zeros((self.rows, value.shape[1], self.columns, value.shape[3]))
        return self.keys[index], self.values[index]

    @torch.inference_mode()
    def load(self, row: int, start: int, blocks: list[list[torch.Tensor | None]], n: int) -> None:
        """The first ``n`` tokens of prefix-cache blocks (worker/kv/prefix.py:
        each block's every layer's keys, then values, [kv heads, block tokens, dim])
        into row ``row`` from column ``start``: one copy per layer."""
        layers = len(blocks[0]) // 2
        for k, first in enumerate(blocks[0]):
            if first is None:
                continue
            buffers, layer = (self.keys, k) if k < layers else (self.values, k - layers)
            while len(buffers) <= layer:
                buffers.append(None)
            if buffers[layer] is None:  # as ``layer`` allocates it at a first write
                buffers[layer] = first.new_zeros((self.rows, first.shape[0], self.columns, first.shape[2]))
            buffers[layer][row, :, start : start + n] = torch.cat([block[k] for block in blocks], dim=1)[:, :n]

    @torch.inference_mode()
    def move(self, source: int, target: int, columns: int) -> None:
        """Row ``source``'s first ``columns`` into row ``target`` (compaction)."""
        for buffers in (self.keys, self.values):
            for t in buffers:
                if t is not None:
                    t[target, :, :columns] = t[source, :, :columns]
