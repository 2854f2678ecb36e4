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
batching use), writes the step's keys and values into the batch's ``KVCache``
at their slots (one write per layer) and attends:

- each decoding row's one query over its own room, a contiguous view of the pool
  (one call per row on the CPU; on CUDA its slots gathered for one batched call:
  worker/kv/cache.py says why);
- the prompts that start in this step, together: one causal attention over their
  packed tokens with a block-diagonal mask (a burst of newcomers costs one call a
  layer, not one per prompt);
- each later chunk of a long prompt over its own room (causal, after the tokens
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
#: Devices whose decode gathers its rows' slots for one batched call rather than
#: making one call per row (a kernel launch each on CUDA: worker/kv/cache.py).
GATHER_DEVICES = {"cuda"}


#: The layout of the packed step whose forward runs on this thread (each engine runs
#: its model's forwards on a thread of its own); None outside a step.
CURRENT_LAYOUT: ContextVar[StepLayout | None] = ContextVar("hive_step_layout", default=None)


@dataclass(frozen=True)
class Segment:
    """A prompt chunk in a step: ``length`` tokens of a row whose room starts at slot
    ``base`` of the cache, from its position ``start``, at ``offset`` in the packed tokens."""

    base: int
    start: int
    length: int
    offset: int


class StepLayout:
    def __init__(self, cache: KVCache, decode_bases: list[int], decode_positions: list[int], segments: list[Segment],
                 device: torch.device):
        """``decode_bases``, ``decode_positions``: each decoding row's first slot and its
        new token's position; the packed tokens are theirs, then the segments'."""
        self.cache = cache
        self.decoding = len(decode_bases)
        # Prompts that start now come first among the segments (Batch.forward packs
        # them so): attended together when there are several.
        fresh = 0
        while fresh < len(segments) and segments[fresh].start == 0:
            fresh += 1
        self.fresh = segments[:fresh] if fresh > 1 else []
        self.segments = segments[len(self.fresh):]
        self._decode = list(zip(decode_bases, decode_positions))
        # Every packed token's slot: one write per layer for the whole step.
        slots = [base + position for base, position in self._decode]
        for segment in segments:
            slots.extend(range(segment.base + segment.start, segment.base + segment.start + segment.length))
        self._slots = torch.tensor(slots, dtype=torch.long, device=device)
        self._width = max(decode_positions, default=0) + 1
        self._groups = decode_groups(decode_bases, decode_positions, cache.capacity)
        self._gather = len(self._groups) > 1 and device.type in GATHER_DEVICES
        if not self._gather:
            order = [i for group in self._groups for i in group.rows]
            # The groups' outputs, concatenated, back in the decoding rows' order.
            self._inverse = None if order == sorted(order) else torch.tensor(order, device=device).argsort()
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

    def masks(self, window: int | None) -> tuple[tuple | None, torch.Tensor | None, list[torch.Tensor | None]]:
        """The decode's (gathered: its slots [rows, width] and mask; else each group's
        mask, ``_decode_mask``), the starting prompts' block-diagonal mask [1, 1, tokens,
        tokens] and each later chunk's [1, 1, length, start + length] (True: attend);
        None where sdpa's own causal or no mask is the same. ``window``: a sliding-window layer's span
        (Mistral, Qwen2's window layers)."""
        if window not in self._masks:
            if self._gather:
                bases, positions = (torch.tensor(v, device=self._device)[:, None] for v in zip(*self._decode))
                columns = torch.arange(self._width, device=self._device)[None, :]
                # A masked column reads one of the row's own slots: finite, never another row's.
                decode = bases + torch.minimum(columns, positions), self._decode_mask([p for _, p in self._decode], window)
            else:
                decode = [self._decode_mask([self._decode[i][1] for i in group.rows], window) if len(group.rows) > 1 else None
                          for group in self._groups]
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

    def _decode_mask(self, positions: list[int], window: int | None) -> torch.Tensor | None:
        """Which of their ``max(positions) + 1`` columns decoding rows attend
        [rows, 1, 1, width]; None where that is all of them."""
        if window is None and len(set(positions)) == 1:
            return None
        columns = torch.arange(max(positions) + 1, device=self._device)[None, :]
        at = torch.tensor(positions, device=self._device)[:, None]
        allowed = columns <= at
        if window is not None:
            allowed &= columns > at - window
        return allowed[:, None, None, :]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               options: dict) -> torch.Tensor:
        """query [1, heads, tokens, dim], key and value [1, kv heads, tokens, dim] of the
        packed tokens; returns attention's output [1, tokens, heads, dim]."""
        keys, values = self.cache.layer(layer, key, value)
        keys.index_copy_(1, self._slots, key[0])
        values.index_copy_(1, self._slots, value[0])
        window = options.get("sliding_window")
        decode, fresh_mask, segment_masks = self.masks(window)
        outputs = []
        n = self.decoding
        if self._gather:
            slots, mask = decode
            q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, dim]
            k, v = keys[:, slots].transpose(0, 1), values[:, slots].transpose(0, 1)  # [n, kv heads, width, dim]
            outputs.append(_attention(q, k, v, mask, False, scaling, options).squeeze(2))
        elif n:
            decoded = []
            for group, mask in zip(self._groups, decode):
                if len(group.rows) == 1:  # one query, over its row's own slots
                    (i,) = group.rows
                    base, position = self._decode[i]
                    first = base + (max(0, position + 1 - window) if window is not None else 0)
                    out = _attention(query[:, :, i : i + 1], keys[None, :, first : base + position + 1],
                                     values[None, :, first : base + position + 1], None, False, scaling, options)
                    decoded.append(out[0].transpose(0, 1))  # [1, heads, dim]
                    continue
                rows = group.rows
                q = (query[0, :, rows[0] : rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1))
                     else query[0, :, rows]).transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
                k, v = (_strided(pool, group.first, group.stride, len(rows), group.width) for pool in (keys, values))
                decoded.append(_attention(q, k, v, mask, False, scaling, options).squeeze(2))
            out = decoded[0] if len(decoded) == 1 else torch.cat(decoded)
            outputs.append(out if self._inverse is None else out.index_select(0, self._inverse))
        if self.fresh:
            start, end = self.fresh[0].offset, self.fresh[-1].offset + self.fresh[-1].length
            # The prompts' own keys are all they attend to: no need to read them back.
            out = _attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], fresh_mask, False,
                             scaling, options)
            outputs.append(out[0].transpose(0, 1))  # [tokens, heads, dim]
        for segment, mask in zip(self.segments, segment_masks):
            chunk = slice(segment.offset, segment.offset + segment.length)
            span = slice(segment.base, segment.base + segment.start + segment.length)
            out = _attention(query[:, :, chunk], keys[None, :, span], values[None, :, span], mask, mask is None, scaling, options)
            outputs.append(out[0].transpose(0, 1))  # [length, heads, dim]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out.unsqueeze(0)


@dataclass(frozen=True)
class DecodeGroup:
    """Decoding rows (indexes in the step's decoding order) whose rooms start at slots
    ``first + k · stride``: one strided view of the pool, ``width`` columns each, reads
    them all (``_strided``), no copy. A view's columns past a row's tokens read the
    next room's slots: finite, and masked."""

    rows: list[int]
    first: int
    stride: int
    width: int


#: How much more than the rows' own columns a group's view may read (``decode_groups``).
GROUP_PADDING = 1.5


def decode_groups(bases: list[int], positions: list[int], capacity: int) -> list[DecodeGroup]:
    """The decoding rows in groups of rooms at a regular stride, in slot order. One
    call per group rather than per row: a call costs about 10 µs whatever its size on
    this project's CPU (``python -m bench.kv_attention``, 16 rows × 30 layers of 60
    tokens: 6.5 ms a step a call per room, 2.1 ms as one view). Any two rooms are at a regular stride; rooms of one size
    packed together (``KVCache._uniform``) make one group of all. A group reads no
    more than GROUP_PADDING times its rows' columns, nor past the pool."""
    order = sorted(range(len(bases)), key=bases.__getitem__)
    groups: list[DecodeGroup] = []
    k = 0
    while k < len(order):
        rows = [order[k]]
        for i in order[k + 1 :]:
            stride = bases[i] - bases[rows[-1]]
            if len(rows) > 1 and stride != bases[rows[1]] - bases[rows[0]]:
                break
            width = max(positions[j] for j in (*rows, i)) + 1
            if bases[i] + width > capacity or width * (len(rows) + 1) > GROUP_PADDING * sum(positions[j] + 1 for j in (*rows, i)):
                break
            rows.append(i)
        width = max(positions[j] for j in rows) + 1
        groups.append(DecodeGroup(rows, bases[rows[0]], bases[rows[1]] - bases[rows[0]] if len(rows) > 1 else 0, width))
        k += len(rows)
    return groups


def _strided(pool: torch.Tensor, first: int, stride: int, rows: int, width: int) -> torch.Tensor:
    """[rows, kv heads, width, dim]: ``width`` slots from ``first + r · stride`` for each
    row ``r``, a view of the pool [kv heads, slots, dim]."""
    heads, slot = pool.stride(0), pool.stride(1)
    return pool.as_strided((rows, pool.shape[0], width, pool.shape[2]), (stride * slot, heads, slot, pool.stride(2)),
                           pool.storage_offset() + first * slot)


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
