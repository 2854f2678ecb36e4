"""Attention for a packed step: one forward pass over every token the batch computes
in a step (each decoding row's next token, then the prompt chunks being prefilled),
packed into one sequence of shape [1, tokens].

Everything but attention (embeddings, projections, MLPs, norms, the LM head) is
per token, so the model's own code runs on the packed tokens unchanged, and every
weight is read once per step however many rows decode and prompts prefill: on a
CPU a step's cost is mostly that read, so a newcomer's prefill no longer costs a
pass of its own beside the decode (what the left-padded batch did). Attention is
per sequence: this module, registered with transformers' ``AttentionInterface``
under ``ATTENTION`` (the same hook vLLM's and transformers' own continuous
batching use), writes each token's keys and values into its row of the batch's
``KVCache`` and attends:

- the decoding rows as one batch, one query each, over the cache's live rows
  (right-padded; a mask hides each row's unused columns);
- the prompts that start in this step, together: one causal attention over their
  packed tokens with a block-diagonal mask (a burst of newcomers costs one call a
  layer, not one per prompt);
- each later chunk of a long prompt over its own row (causal, after the tokens
  already in it).

A step's layout (which rows decode, which chunks prefill, the masks) is built once
per step and reaches every layer through ``CURRENT_LAYOUT``, a context variable set
for the step's forward (``StepLayout.active``). Not as a keyword passed down the
model, as it once was: a model whose decoder layer drops the keywords it does not
name (Nemotron's) silently ran plain attention over the packed tokens, the rows
attending to one another, and answered with other text than ``generate``. Hand-written
because transformers' paged cache (``PagedAttentionCache`` with the "paged|sdpa"
attention) gathers every row's blocks into one flat copy per layer and step, which
bench/engines.py measured slower on this CPU than Hive's own batch.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine.unsupported import UnsupportedModel
from worker.kv.cache import KVCache

ATTENTION = "hive_packed"


#: The layout of the packed step whose forward runs on this thread (each engine runs
#: its model's forwards on a thread of its own); None outside a step.
CURRENT_LAYOUT: ContextVar[StepLayout | None] = ContextVar("hive_step_layout", default=None)


@dataclass(frozen=True)
class Segment:
    """A prompt chunk in a step: ``length`` tokens of row ``row`` from its position
    ``start``, at ``offset`` in the packed tokens."""

    row: int
    start: int
    length: int
    offset: int


class StepLayout:
    def __init__(self, cache: KVCache, rows: int, decode_rows: list[int], decode_positions: list[int],
                 segments: list[Segment], device: torch.device):
        self.cache = cache
        self.rows = rows
        self.decoding = len(decode_rows)
        # Prompts that start now come first among the segments (Batch.forward packs
        # them so): attended together when there are several.
        fresh = 0
        while fresh < len(segments) and segments[fresh].start == 0:
            fresh += 1
        self.fresh = segments[:fresh] if fresh > 1 else []
        self.segments = segments[len(self.fresh):]
        self._fresh_rows = torch.tensor([s.row for s in self.fresh], dtype=torch.long, device=device)
        self._fresh_same_length = len({s.length for s in self.fresh}) == 1
        self._all_decode = decode_rows == list(range(rows))
        self._decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        self._decode_positions = torch.tensor(decode_positions, dtype=torch.long, device=device)
        # Rows that prefill this step have no query of their own; their dummy one reads column 0.
        self._row_positions = torch.zeros(rows, dtype=torch.long, device=device)
        self._row_positions[self._decode_rows] = self._decode_positions
        self._width = max(decode_positions, default=0) + 1
        self._same_length = self._all_decode and len(set(decode_positions)) == 1
        self._device = device
        self._masks: dict[int | None, tuple] = {}

    @contextlib.contextmanager
    def active(self):
        """This layout for every attention layer of the forward run inside."""
        token = CURRENT_LAYOUT.set(self)
        try:
            yield self
        finally:
            CURRENT_LAYOUT.reset(token)

    def masks(self, window: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
        """The decode batch's mask [rows, 1, 1, width], the starting prompts' block-diagonal
        one [1, 1, tokens, tokens] and each later chunk's [1, 1, length, start + length]
        (True: attend); None where sdpa's own causal or no mask is the same.
        ``window``: a sliding-window layer's span (Mistral, Qwen2's window layers)."""
        if window not in self._masks:
            decode = None
            if self.decoding and (window is not None or not self._same_length):
                columns = torch.arange(self._width, device=self._device)
                positions = self._row_positions[:, None]
                allowed = columns[None, :] <= positions
                if window is not None:
                    allowed &= columns[None, :] > positions - window
                decode = allowed[:, None, None, :]
            fresh = None
            if self.fresh:
                owner = torch.cat([torch.full((s.length,), k, device=self._device) for k, s in enumerate(self.fresh)])
                position = torch.cat([torch.arange(s.length, device=self._device) for s in self.fresh])
                allowed = (owner[:, None] == owner[None, :]) & (position[None, :] <= position[:, None])
                if window is not None:
                    allowed &= position[None, :] > position[:, None] - window
                fresh = allowed[None, None]
            segments = []
            for segment in self.segments:
                if segment.start == 0 and window is None:
                    segments.append(None)  # causal from the first token: sdpa's is_causal
                    continue
                queries = torch.arange(segment.start, segment.start + segment.length, device=self._device)[:, None]
                keys = torch.arange(segment.start + segment.length, device=self._device)[None, :]
                allowed = keys <= queries
                if window is not None:
                    allowed &= keys > queries - window
                segments.append(allowed[None, None])
            self._masks[window] = (decode, fresh, segments)
        return self._masks[window]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               options: dict) -> torch.Tensor:
        """query [1, heads, tokens, dim], key and value [1, kv heads, tokens, dim] of the
        packed tokens; returns attention's output [1, tokens, heads, dim]."""
        keys, values = self.cache.layer(layer, key, value)
        decode_mask, fresh_mask, segment_masks = self.masks(options.get("sliding_window"))
        outputs = []
        n = self.decoding
        if n:
            # Each decoding row's new key and value go to its column; then one query a row.
            keys[self._decode_rows, :, self._decode_positions] = key[0, :, :n].transpose(0, 1)
            values[self._decode_rows, :, self._decode_positions] = value[0, :, :n].transpose(0, 1)
            q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, dim]
            if not self._all_decode:
                q = q.new_zeros((self.rows, *q.shape[1:])).index_copy_(0, self._decode_rows, q)
            out = _attention(q, keys[: self.rows, :, : self._width], values[: self.rows, :, : self._width],
                             decode_mask, False, scaling, options)
            if not self._all_decode:
                out = out.index_select(0, self._decode_rows)
            outputs.append(out.squeeze(2))  # [n, heads, dim]
        if self.fresh:
            start, end = self.fresh[0].offset, self.fresh[-1].offset + self.fresh[-1].length
            new_keys, new_values = key[:, :, start:end], value[:, :, start:end]
            if self._fresh_same_length:  # a burst of equal prompts: one write for all
                n, length = len(self.fresh), self.fresh[0].length
                keys[self._fresh_rows, :, :length] = new_keys[0].unflatten(1, (n, length)).transpose(0, 1)
                values[self._fresh_rows, :, :length] = new_values[0].unflatten(1, (n, length)).transpose(0, 1)
            else:
                for segment in self.fresh:
                    chunk = slice(segment.offset - start, segment.offset - start + segment.length)
                    keys[segment.row, :, : segment.length] = new_keys[0, :, chunk]
                    values[segment.row, :, : segment.length] = new_values[0, :, chunk]
            # The prompts' own keys are all they attend to: no need to read them back.
            out = _attention(query[:, :, start:end], new_keys, new_values, fresh_mask, False, scaling, options)
            outputs.append(out[0].transpose(0, 1))  # [tokens, heads, dim]
        for segment, mask in zip(self.segments, segment_masks):
            row, start, end = segment.row, segment.start, segment.start + segment.length
            chunk = slice(segment.offset, segment.offset + segment.length)
            keys[row, :, start:end] = key[0, :, chunk]
            values[row, :, start:end] = value[0, :, chunk]
            out = _attention(query[:, :, chunk], keys[row : row + 1, :, :end], values[row : row + 1, :, :end],
                             mask, mask is None, scaling, options)
            outputs.append(out[0].transpose(0, 1))  # [length, heads, dim]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out.unsqueeze(0)


def _attention(q, k, v, mask, is_causal: bool, scaling, options: dict) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads; softcapped logits (Gemma 2)
    and attention sinks (gpt-oss) take the explicit path, which sdpa has no option for."""
    softcap, sinks = options.get("softcap"), options.get("s_aux")
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs.to(v.dtype) @ v


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls in each attention layer: a packed step's inside
    ``StepLayout.active``, plain sdpa otherwise (the model's own forward, as the
    self-check's reference: worker/engine/batch.py)."""
    layout = CURRENT_LAYOUT.get()
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] > 1:
        # A recurrent model's forward (worker/engine/batch.py): rows of equal length,
        # batch-major [rows, heads, length, dim]; packed one row after the other, they
        # are the layout's decoding rows (length 1) or its segments.
        rows, length = query.shape[0], query.shape[2]
        packed = (t.transpose(0, 1).reshape(1, t.shape[1], rows * length, t.shape[3]) for t in (query, key, value))
        out = layout.attend(module.layer_idx, *packed, scaling, kwargs)
        return out.reshape(rows, length, *out.shape[2:]), None
    return layout.attend(module.layer_idx, query, key, value, scaling, kwargs), None


AttentionInterface.register(ATTENTION, packed_attention)


def use_packed_attention(model, recurrent: bool = False) -> None:
    """Switches ``model`` to packed attention; a model whose attention layers do not
    go through transformers' AttentionInterface cannot batch this way.

    ``recurrent``: a hybrid (worker/engine/recurrent_state.py). Those do not claim
    ``_supports_attention_backend``, since transformers' own continuous batching
    cannot carry their state, yet their attention layers do go through the
    interface; the self-check (worker/engine/self_check.py) holds them to their own logits."""
    if not (recurrent or getattr(model, "_supports_attention_backend", False)):
        raise UnsupportedModel(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "which Hive's batching engine needs"
        )
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
