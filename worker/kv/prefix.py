"""Prefix caching: the keys and values of full blocks of tokens that a batch has
computed, kept after their sequence leaves, so that a later prompt starting with
the same tokens copies them into its row instead of computing them again.

A block is ``BLOCK_TOKENS`` tokens. Its hash chains its parent's (vLLM v1's
automatic prefix caching): block ``j`` of a sequence stands for all of tokens
``0 .. (j+1)·B``, so one lookup per block finds the longest cached prefix, and the
tokens are compared on a hit, so a collision can never hand a row another text's
keys. The chain's root is seeded with the model (repository, revision, dtype) and
a salt: by default the API key's owner, so that one key never finds another's
prompt cached (a hit is faster, and the first-token time would tell); an operator
can share the cache across keys (``--prefix-cache-scope shared``).

Blocks of decoded tokens are kept too: the next turn of a conversation, whose
prompt holds the reply, finds it. A hit never covers a prompt's last token: its
logits come from computing it.

The blocks live here, beside the batch's rows, in arenas of slots allocated 64 MiB
at a time (``Arena``), and are copied into a row on a hit (worker/engine/batch.py
``reuse``): the rows stay contiguous, so the decode step attends over one slice per
layer as before. Copying a 512-token prefix is one copy per layer, well under a
millisecond of the ~1 s its prefill takes on this project's CPU. Once the arenas
fill their limit (the prefix cache's size, within what the rows leave of the
budget), the least recently used block's slot is reused; a chain's tail goes
before its head (``match`` touches a hit's blocks from the last to the first),
since a head without its tail is still a hit and a tail without its head never is.
When the rows or another model need memory, whole arenas are given back.

Eligible: every model on the packed path whose every layer keeps keys and values,
sliding-window layers included (a row holds all its columns; the window is a
mask). Not eligible: hybrids and state-space models (their recurrent state at the
block boundary is not kept) and models on the "own" path.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.kv.cache import BLOCK_TOKENS


def chain_root(seed: str, salt: str) -> int:
    """The hash a sequence's first block chains from: the model's ``seed`` and the salt."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{salt}".encode(), digest_size=8).digest(), "little")


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    # Python's tuple hash of ints: deterministic, about 0.3 µs for 16 tokens; a
    # collision costs nothing but a miss, since the tokens are compared on a hit.
    return hash((parent, tokens))


#: An arena's size: block slots are allocated this many bytes at a time and reused,
#: since writing into freshly allocated memory (first-touch page faults) cost ten
#: times the copy itself: 0.86 s against 0.08 s for a wave's 592 blocks of the
#: 135M-shaped model, 4% of its step time at 0% hits (bench/prefix.py).
ARENA_BYTES = 64 << 20
#: The cache's size on the CPU unless the operator sets one (--prefix-cache-memory):
#: once full, its memory is reused rather than grown.
CPU_CAP_BYTES = 1 << 30


def default_cap(device: torch.device) -> int:
    """1 GiB on the CPU; elsewhere, whatever the rows leave of the budget."""
    return CPU_CAP_BYTES if device.type == "cpu" else 1 << 62


@dataclass(eq=False)
class Arena:
    """Slots for blocks, one allocation: [slots, a block's keys and values, flat]."""

    data: torch.Tensor
    #: The block hash in each slot, or None; and the free slots (a stack).
    hashes: list[int | None]
    free: list[int]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass(eq=False)
class Block:
    tokens: tuple[int, ...]
    arena: Arena
    slot: int


class PrefixCache:
    """The cached blocks of one model's batch, least recently used first. Thread-safe:
    the engine's thread hits and stores; another model's batch or a model being
    loaded may take memory back (``evict``)."""

    def __init__(self, seed: str):
        self.seed = seed
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self._lock = threading.Lock()
        self._roots: dict[str, int] = {}
        #: Where a slot holds each layer's keys, then each layer's values: (index in
        #: ``parts``, offset, shape [kv heads, BLOCK_TOKENS, dim]); set at the first store.
        self._layout: list[tuple[int, int, tuple[int, int, int]]] = []
        self._layers = 0
        self._block_numel = 0
        self._arenas: list[Arena] = []
        self._held = 0  # the arenas' bytes
        #: Prompt tokens looked up and tokens found (Prometheus counters, in tokens).
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        """What the arenas hold (an arena counts whole while it is kept)."""
        return self._held

    def root(self, salt: str) -> int:
        if salt not in self._roots:
            self._roots[salt] = chain_root(self.seed, salt)
        return self._roots[salt]

    def match(self, hashes: list[int], tokens: list[int], first: int, last: int) -> list[Block]:
        """The cached blocks ``first``, ``first + 1``, … (below ``last``) of a sequence
        whose full blocks hash to ``hashes``, up to the first one missing."""
        found: list[Block] = []
        with self._lock:
            for j in range(first, last):
                block = self._blocks.get(hashes[j])
                if block is None or block.tokens != tuple(tokens[j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS]):
                    break
                found.append(block)
            self._touch(hashes, first, first + len(found))
        return found

    def _store(self, row, cache, first: int, end: int, hashes: list[int], limit_bytes: int) -> None:
        """Copies the row's blocks ``first`` to ``end`` into free slots, recycling the
        least recently used blocks' once the arenas fill ``limit_bytes``; consecutive
        slots take one copy per layer for them all."""
        parts = [*cache.keys, *cache.values]  # every layer's keys, then every layer's values
        if not self._layout:
            self._layers = len(parts) // 2
            offset = 0
            for k, part in enumerate(parts):
                if part is not None:
                    shape = (part.shape[0], BLOCK_TOKENS, part.shape[2])
                    self._layout.append((k, offset, shape))
                    offset += math.prod(shape)
            self._block_numel = offset
        some = next(part for part in parts if part is not None)
        with self._lock:
            if self._held > limit_bytes:
                self._release(self._held - limit_bytes)
            slots = []
            for _ in range(first, end):
                slot = self._free_slot(some, limit_bytes)
                if slot is None:
                    break
                slots.append(slot)
            j = first
            for arena, start, count in _runs(slots):
                columns = slice(row.start + j * BLOCK_TOKENS, row.start + (j + count) * BLOCK_TOKENS)
                for k, offset, (heads, tokens, dim) in self._layout:
                    source = parts[k][:, columns].view(heads, count, tokens, dim).transpose(0, 1)
                    arena.data[start : start + count, offset : offset + heads * tokens * dim].view(count, heads, tokens, dim).copy_(source)
                for slot in range(start, start + count):
                    arena.hashes[slot] = hashes[j]
                    self._blocks[hashes[j]] = Block(tuple(row.tokens[j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS]), arena, slot)
                    j += 1
            self._touch(hashes, first, j)

    def _touch(self, hashes: list[int], first: int, end: int) -> None:
        """Blocks ``first`` to ``end`` of a chain are the most recently used, its head
        most of all: a chain's tail is evicted before its head. Under the lock."""
        for j in reversed(range(first, end)):
            if hashes[j] in self._blocks:
                self._blocks.move_to_end(hashes[j])

    def leave(self, row) -> None:
        """The row leaves the batch: its chain, head last, becomes the most recently used."""
        if row.root is not None and row.published:
            with self._lock:
                self._touch(row.hashes, 0, row.published)

    def _free_slot(self, like: torch.Tensor, limit_bytes: int) -> tuple[Arena, int] | None:
        """A slot: a free one, a new arena's within ``limit_bytes``, or the least
        recently used block's. Under the lock."""
        for arena in self._arenas:
            if arena.free:
                return arena, arena.free.pop()
        block_bytes = self._block_numel * like.element_size()
        slots = min(ARENA_BYTES, limit_bytes - self._held) // block_bytes
        if slots >= 1:
            arena = Arena(like.new_empty((slots, self._block_numel)), [None] * slots, list(range(slots - 1, -1, -1)))
            self._arenas.append(arena)
            self._held += arena.nbytes
            return arena, arena.free.pop()
        if not self._blocks:
            return None
        key, block = self._blocks.popitem(last=False)
        block.arena.hashes[block.slot] = None
        return block.arena, block.slot

    def _release(self, nbytes: int) -> int:
        """Frees whole arenas, the least recently used block's first, with every block
        in them, until ``nbytes`` are freed; returns the bytes freed. Under the lock."""
        freed = 0
        while self._arenas and freed < nbytes:
            arena = next((a for a in self._arenas if len(a.free) == len(a.hashes)), None)
            if arena is None:
                arena = next(iter(self._blocks.values())).arena if self._blocks else self._arenas[0]
            for key in arena.hashes:
                if key is not None:
                    del self._blocks[key]
            self._arenas.remove(arena)
            self._held -= arena.nbytes
            freed += arena.nbytes
        return freed

    def parts(self, block: Block) -> list[torch.Tensor | None]:
        """Views of a block's keys and values, as ``store`` took them."""
        parts: list[torch.Tensor | None] = [None] * (2 * self._layers)
        data = block.arena.data[block.slot]
        for k, offset, shape in self._layout:
            parts[k] = data[offset : offset + math.prod(shape)].view(shape)
        return parts

    # A row's side (worker/engine/batch.py's Row: ``tokens``, ``root``, ``hashes``,
    # ``published``, ``cached``, ``looked_up``).

    def reuse(self, row, cache) -> int:
        """Before a prefilling row's next chunk: the cached blocks that continue its
        prompt from where it stands, copied into its row of ``cache`` (a KVCache);
        returns the tokens it no longer computes."""
        if row.root is None or row.next_id is not None or row.length % BLOCK_TOKENS:
            return 0
        prompt = len(row.prompt_ids)
        if not row.looked_up:
            row.looked_up = True
            self.queries += prompt
        first, last = row.length // BLOCK_TOKENS, prompt // BLOCK_TOKENS
        if first >= last:
            return 0
        blocks = self.match(hashes_upto(row, last), row.tokens, first, last)
        # Never the prompt's last token: its logits come from computing it.
        n = min(len(blocks) * BLOCK_TOKENS, prompt - 1 - row.length)
        if n <= 0:
            return 0
        cache.load(row, row.length, [self.parts(block) for block in blocks], n)
        row.length += n
        row.cached += n
        row.published = max(row.published, first + len(blocks))
        self.hits += n
        return n

    def next_block(self, row) -> int | None:
        """The hash of the prompt block a prefilling row computes next, if it starts one."""
        if row.root is None or row.length % BLOCK_TOKENS or (row.length + BLOCK_TOKENS) > len(row.prompt_ids):
            return None
        block = row.length // BLOCK_TOKENS
        return hashes_upto(row, block + 1)[block]

    def publish(self, row, cache, room: Callable[[], int]) -> None:
        """Keeps the row's blocks that have filled since it last published, within
        ``room()`` bytes (asked only when a block has filled: it reads the worker's
        budget, under a lock, and most steps fill none)."""
        if row.root is None:
            return
        full = row.length // BLOCK_TOKENS
        if full <= row.published:
            return
        hashes = hashes_upto(row, full)
        j = row.published
        while j < full:  # each run of blocks not cached yet, stored together
            end = j
            while end < full and hashes[end] not in self._blocks:
                end += 1
            if end > j:
                self._store(row, cache, j, end, hashes, room())
            j = end + 1
        row.published = full

    def evict(self, nbytes: int) -> int:
        """Gives back whole arenas (``_release``) until ``nbytes`` are freed (or none is
        left); returns the bytes freed."""
        with self._lock:
            return self._release(nbytes)


def hashes_upto(row, blocks: int) -> list[int]:
    """The row's chained block hashes, extended to its first ``blocks`` full blocks."""
    hashes = row.hashes
    while len(hashes) < blocks:
        k = len(hashes)
        hashes.append(block_hash(hashes[-1] if hashes else row.root, tuple(row.tokens[k * BLOCK_TOKENS : (k + 1) * BLOCK_TOKENS])))
    return hashes


def _runs(slots: list[tuple[Arena, int]]) -> list[tuple[Arena, int, int]]:
    """(arena, first slot, count) for each run of consecutive slots of one arena."""
    runs: list[tuple[Arena, int, int]] = []
    for arena, slot in slots:
        if runs and runs[-1][0] is arena and runs[-1][1] + runs[-1][2] == slot:
            runs[-1] = (arena, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((arena, slot, 1))
    return runs
