"""The KV cache of one model's batch: a pool of token slots per layer, keys and
values of shape [kv heads, slots, head dim], allocated in blocks of
``BLOCK_TOKENS`` tokens as the rows' tokens arrive.

Each row holds one run of slots, its room (``Row.start``, ``Row.room``), so that a
decode step attends over contiguous views of the pool, not copies: on this
project's 2-core CPU (``python -m bench.kv_attention``: 30 layers of the
135M-shaped model, 16 rows of 40–380 tokens) gathering scattered 16-token blocks
into a staging buffer for one batched sdpa cost 14.8 ms a step, one sdpa per room
10.1 ms, and the rectangular cache Hive used before 9.0 ms, which reserved every
row at the widest row's length (2.2× the live tokens at the median step of 16
mixed streams). Rooms at a regular stride read as one strided view cost what the
rectangular cache did (worker/engine/packed_attention.py groups them so).

A step's new keys and values are written with one ``index_copy_`` per layer at
their slots, whatever the mix of decodes and prompt chunks. A row that needs more
room grows in place where the slots after it are free (it is the topmost, or the
row above it has left), else moves to the top (one copy of its tokens), else the
rows are packed down first (``_pack``). What a row holds is at most a block beyond
its tokens, plus the headroom of its last growth (an eighth). (A prefilling row
given room for its whole prompt at once moved less, but held up to 1.56× the live
tokens at the steps of 16 mixed streams where prompts were half computed, and was
no faster on bench/prefix.py's shared waves.)

The pool itself (``capacity``) is what the scheduler reserves against the memory
budget, ahead of the rows' needs so that newcomers and growth rarely reallocate it;
it is given back when it is more than twice what the rows hold.

A hybrid model's rows hold a recurrent state beside their keys and values
(worker/engine/recurrent_state.py): the reservation counts it per row
(``bytes_per_row``), so the memory budget holds for hybrids too.
"""

from __future__ import annotations

import torch

from worker.engine.recurrent_state import ATTENTION_FREE_TYPES, layer_types, text_config

#: Tokens per block: rooms are whole blocks, and the prefix cache keeps blocks of it
#: (worker/kv/prefix.py), as in vLLM.
BLOCK_TOKENS = 16


#: How much more than the rows' tokens one room size for all may hold (``KVCache._uniform``).
UNIFORM_SLACK = 1.12


def round_tokens(tokens: int) -> int:
    """``tokens`` rounded up to whole blocks."""
    return -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS


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
    def __init__(self, rows: list, bytes_per_token: int, bytes_per_row: int = 0):
        """``rows``: the batch's live rows (its own list, kept up to date by the batch).
        ``bytes_per_row``: what each row holds besides its tokens' keys and values (a
        hybrid's recurrent state, kept beside this cache)."""
        self.rows = rows
        self.bytes_per_token = bytes_per_token
        self.bytes_per_row = bytes_per_row
        #: Per layer (by the attention module's ``layer_idx``): keys and values pools,
        #: allocated at the layer's first write, or None.
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.capacity = 0  # slots reserved
        self.top = 0  # the first slot above every row's room

    def reserved_bytes(self, tokens: int | None = None, rows: int = 0) -> int:
        """Bytes of a pool of ``tokens`` slots (by default the current one) and ``rows`` rows' other state."""
        return (self.capacity if tokens is None else tokens) * self.bytes_per_token + rows * self.bytes_per_row

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._pools())

    def _pools(self) -> list[torch.Tensor]:
        return [t for t in (*self.keys, *self.values) if t is not None]

    @property
    def held(self) -> int:
        """Slots the rows hold."""
        return sum(row.room for row in self.rows)

    @torch.inference_mode()
    def reserve(self, capacity: int) -> None:
        """A pool of ``capacity`` slots (whole blocks), the rows packed at its bottom;
        the caller checked it against the memory budget and the rows' rooms."""
        capacity = round_tokens(capacity)
        if capacity != self.capacity:
            assert capacity >= self.held
            self._pack({}, capacity)

    def add(self, row, room: int) -> None:
        """A room of ``room`` slots for a row that has just joined the rows."""
        row.start, row.room = self.top, 0
        self.fit({row: room}, headroom=False)

    @torch.inference_mode()
    def fit(self, needs: dict, headroom: bool = True) -> None:
        """Rooms of at least ``needs[row]`` slots for those rows, with an eighth more
        where the pool has it (``headroom``), so a decoding row grows every few dozen
        tokens rather than every block."""
        grow = {row: round_tokens(need) for row, need in needs.items() if need > row.room}
        if not grow:
            return
        if headroom and self._uniform(needs):
            return
        free = self.capacity - self.held
        if headroom:
            wide = {row: round_tokens(max(need, row.room + row.room // 8)) for row, need in grow.items()}
            if sum(wide.values()) - sum(row.room for row in wide) <= free:
                grow = wide
        if sum(grow.values()) - sum(row.room for row in grow) > free:
            raise RuntimeError(f"the KV cache's {self.capacity} slots cannot hold the rows' next tokens")
        for row, room in grow.items():
            if row.start + room <= self._next_start(row):
                self.top = max(self.top, row.start + room)  # in place, into the free slots after it
            elif self.top + room <= self.capacity:
                self._move(row, self.top)
                self.top += room
            else:
                self._pack(grow, self.capacity)
                return
            row.room = room

    def _next_start(self, row) -> int:
        """Where the next room above ``row``'s starts (the pool's end if none does)."""
        return min((other.start for other in self.rows if other.start > row.start or (other.start == row.start and other.room
                    and other is not row)), default=self.capacity)

    def _uniform(self, needs: dict) -> bool:
        """Rows of about one length (a burst of equal prompts): every room made one size,
        a sixteenth past the longest need, where that holds under 1.12× the rows'
        tokens, and packed in the batch's order, so that the decode reads them as one
        strided view (worker/engine/packed_attention.py) as it read the rectangular
        cache. Before rooms were grouped, 16 equal streams ran 116 against 127 tokens/s
        in process (one call per room: ``python -m bench.kv_attention``)."""
        if len(self.rows) < 2:
            return False
        wants = [max(row.length, needs.get(row, 0)) for row in self.rows]
        room = round_tokens(max(wants) * 17 // 16)
        used = sum(wants)
        if room * len(self.rows) > min(self.capacity, UNIFORM_SLACK * used):
            return False
        self._pack(dict.fromkeys(self.rows, room), self.capacity, in_batch_order=True)
        return True

    def release(self) -> None:
        """After a row left: the slots above the others' rooms are free."""
        self.top = max((row.start + row.room for row in self.rows), default=0)

    def _move(self, row, start: int) -> None:
        """A row's tokens to slots from ``start``, above every row (no overlap)."""
        if row.length:
            for pool in self._pools():
                pool[:, start : start + row.length] = pool[:, row.start : row.start + row.length]
        row.start = start

    def _pack(self, rooms: dict, capacity: int, in_batch_order: bool = False) -> None:
        """The rows one after the other from slot 0, each with its room in ``rooms`` or
        its own, into a pool of ``capacity`` slots: new pools where the capacity
        changes, else in place. They go in the order they lie, those in ``rooms`` last
        (so the others all move down), or in the batch's order (``_uniform``). In place,
        the rows that move up are copied out first, and those that move down go lowest
        first: such a row's new span ends below its old room's end, so below every row
        still to move. (Packing in the batch's order always, py-spy found 3% of the
        worker's time in bench/prefix.py's shared waves copying rows out.)"""
        order = sorted(self.rows, key=lambda row: row.start)
        layout = list(self.rows) if in_batch_order else [row for row in order if row not in rooms] + [
            row for row in order if row in rooms]
        starts, cursor = {}, 0
        for row in layout:
            starts[row] = cursor
            cursor += rooms.get(row, row.room)
        if capacity != self.capacity:
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    if old is None:
                        continue
                    new = old.new_zeros((old.shape[0], capacity, old.shape[2])) if capacity else None
                    for row in order if capacity else ():
                        new[:, starts[row] : starts[row] + row.length] = old[:, row.start : row.start + row.length]
                    buffers[i] = new
        else:
            pools = self._pools()
            up = {row: [pool[:, row.start : row.start + row.length].clone() for pool in pools]
                  for row in order if starts[row] > row.start and row.length}
            for row in order:
                if row in up or starts[row] == row.start or not row.length:
                    continue
                for pool in pools:  # down: a clone where the two spans overlap
                    source = pool[:, row.start : row.start + row.length]
                    pool[:, starts[row] : starts[row] + row.length] = source.clone() if row.start < starts[row] + row.length else source
            for row, parts in up.items():
                for pool, part in zip(pools, parts):
                    pool[:, starts[row] : starts[row] + row.length] = part
        for row in order:
            row.start, row.room = starts[row], rooms.get(row, row.room)
        self.capacity, self.top = capacity, cursor

    def layer(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values pools, allocated on first use after the
        layer's new keys and values ([1, kv heads, tokens, dim]; MLA's differ in dim)."""
        while len(self.keys) <= index:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[index] is None:
            # Zeros, not garbage: a masked slot still meets a zero probability in
            # attention's sums, and 0 × NaN would be NaN.
            self.keys[index] = key.new_zeros((key.shape[1], self.capacity, key.shape[3]))
            self.values[index] = value.new_zeros((value.shape[1], self.capacity, value.shape[3]))
        return self.keys[index], self.values[index]

    @torch.inference_mode()
    def load(self, row, start: int, blocks: list[list[torch.Tensor | None]], n: int) -> None:
        """The first ``n`` tokens of prefix-cache blocks (worker/kv/prefix.py:
        each block's every layer's keys, then values, [kv heads, block tokens, dim])
        into ``row``'s room (grown for them) from its token ``start``: one copy per layer."""
        self.fit({row: start + n}, headroom=False)
        layers = len(blocks[0]) // 2
        at = row.start + start
        for k, first in enumerate(blocks[0]):
            if first is None:
                continue
            buffers, layer = (self.keys, k) if k < layers else (self.values, k - layers)
            while len(buffers) <= layer:
                buffers.append(None)
            if buffers[layer] is None:  # as ``layer`` allocates it at a first write
                buffers[layer] = first.new_zeros((first.shape[0], self.capacity, first.shape[2]))
            buffers[layer][:, at : at + n] = torch.cat([block[k] for block in blocks], dim=1)[:, :n]
