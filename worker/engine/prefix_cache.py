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

The blocks live here, beside the batch's rows, and are copied into a row on a hit
(worker/engine/batch.py ``reuse``): the rows stay contiguous, so the decode step
attends over one slice per layer as before. Copying a 512-token prefix is one
copy per layer, well under a millisecond of the ~1 s its prefill takes on this
project's CPU. Least recently used blocks go first when the pool is full or the
rows need its memory; a chain's tail goes before its head (``match`` touches a
hit's blocks from the last to the first), since a head without its tail is still
a hit and a tail without its head never is.

Eligible: every model on the packed path whose every layer keeps keys and values,
sliding-window layers included (a row holds all its columns; the window is a
mask). Not eligible: hybrids and state-space models (their recurrent state at the
block boundary is not kept) and models on the "own" path.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

#: Tokens per block, as in vLLM: a hit is rounded down to it, and each block costs
#: one hash and one dictionary entry.
BLOCK_TOKENS = 16


def chain_root(seed: str, salt: str) -> int:
    """The hash a sequence's first block chains from: the model's ``seed`` and the salt."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{salt}".encode(), digest_size=8).digest(), "little")


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    # Python's tuple hash of ints: deterministic, about 0.3 µs for 16 tokens; a
    # collision costs nothing but a miss, since the tokens are compared on a hit.
    return hash((parent, tokens))


@dataclass(eq=False)
class Block:
    tokens: tuple[int, ...]
    #: Per layer (by ``layer_idx``): keys and values [kv heads, BLOCK_TOKENS, dim], or None
    #: for a layer that keeps none.
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]


class PrefixCache:
    """The cached blocks of one model's batch, least recently used first. Thread-safe:
    the engine's thread hits and stores; another model's batch or a model being
    loaded may take memory back (``evict``)."""

    def __init__(self, seed: str, bytes_per_token: int):
        self.seed = seed
        self.bytes_per_block = bytes_per_token * BLOCK_TOKENS
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self._lock = threading.Lock()
        self._roots: dict[str, int] = {}
        #: Prompt tokens looked up and tokens found (Prometheus counters, in tokens).
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self.bytes_per_block

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
            for j in reversed(range(first, first + len(found))):
                self._blocks.move_to_end(hashes[j])
        return found

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def store(self, block: int, tokens: tuple[int, ...], keys: list[torch.Tensor | None], values: list[torch.Tensor | None],
              limit_bytes: int) -> None:
        """Keeps a copy of a full block's keys and values (views into a row: copied
        here), making room within ``limit_bytes`` from the least recently used."""
        if limit_bytes < self.bytes_per_block:
            return
        copied = Block(tokens, [k.clone() if k is not None else None for k in keys],
                       [v.clone() if v is not None else None for v in values])
        with self._lock:
            self._blocks[block] = copied
            while self.bytes > limit_bytes:
                self._blocks.popitem(last=False)

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
        cache.load(row.index, row.length, blocks, n)
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

    def publish(self, row, cache, limit_bytes: int) -> None:
        """Keeps the row's blocks that have filled since it last published."""
        if row.root is None:
            return
        full = row.length // BLOCK_TOKENS
        hashes = hashes_upto(row, full)
        for j in range(row.published, full):
            if hashes[j] not in self._blocks:
                start, end = j * BLOCK_TOKENS, (j + 1) * BLOCK_TOKENS
                keys = [k[row.index, :, start:end] if k is not None else None for k in cache.keys]
                values = [v[row.index, :, start:end] if v is not None else None for v in cache.values]
                self.store(hashes[j], tuple(row.tokens[start:end]), keys, values, limit_bytes)
        row.published = full

    def evict(self, nbytes: int) -> int:
        """Drops least recently used blocks until ``nbytes`` are freed (or none is
        left); returns the bytes freed."""
        freed = 0
        with self._lock:
            while self._blocks and freed < nbytes:
                self._blocks.popitem(last=False)
                freed += self.bytes_per_block
        return freed

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()


def hashes_upto(row, blocks: int) -> list[int]:
    """The row's chained block hashes, extended to its first ``blocks`` full blocks."""
    hashes = row.hashes
    while len(hashes) < blocks:
        k = len(hashes)
        hashes.append(block_hash(hashes[-1] if hashes else row.root, tuple(row.tokens[k * BLOCK_TOKENS : (k + 1) * BLOCK_TOKENS])))
    return hashes
