"""The running sequences of one model as one batch: one KV cache (worker/kv/cache.py)
and one forward pass per step for all of them, decodes and prefills together
(worker/engine/packed_attention.py).

A sequence holds a ``Row``: its index in the cache, the tokens it has there, and
the token it feeds next. A newcomer's row prefills its prompt in chunks, as many
tokens a step as the scheduler gives it, in the same pass as the running rows'
decode; with its prompt's last chunk it gets its logits, and from the next step
it decodes. A row that ends leaves at once (the last row takes its index).

Models with recurrent layers and those that need their own cache take other
paths through the same rows (``PATHS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.engine.packed_attention import Segment, StepLayout, use_packed_attention
from worker.engine.recurrent_state import RecurrentState, cache_keyword, has_attention, is_recurrent
from worker.kv.cache import KVCache, kv_bytes_per_token
from worker.kv.prefix import PrefixCache

#: How a model's batch computes a step (worker/engine/self_check.py picks one per model):
#: "packed": one forward for every row's tokens; a hybrid's recurrent layers get
#: their rows' states (worker/engine/recurrent_state.py). "own": each row through the
#: model's own forward and its own transformers cache, as ``generate`` runs it, for
#: the families the packed step cannot carry: correct, slower, still many jobs at once.
PATHS = ("packed", "own")


@dataclass(eq=False)
class Row:
    owner: object  # the engine's RunningJob
    prompt_ids: list[int]
    #: The most tokens it can have: its prompt and max_tokens.
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
    #: Its room in the KV cache: ``room`` slots from slot ``start`` (worker/kv/cache.py).
    start: int = 0
    room: int = 0
    #: Its transformers cache, on the "own" path (``Batch._own``).
    own_cache: object = None
    #: Prefix caching (worker/kv/prefix.py): the chain's root (None: the row
    #: neither reads nor leaves blocks), its prompt then every token fed, its full
    #: blocks' hashes so far, the blocks kept or found cached, the prompt tokens it
    #: copied rather than computed, and whether its prompt was looked up yet.
    root: int | None = None
    #: A preempted job's row, back in the batch: the token its prompt (the tokens it
    #: had) is followed by, already sampled and sent, fed instead of sampling again.
    then: int | None = None
    tokens: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    published: int = 0
    cached: int = 0
    looked_up: bool = False

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.length if self.next_id is None else 0


class Batch:
    def __init__(self, model, path: str, prefix_seed: str | None = None):
        """``path``: one of PATHS, the one the self-check picked for this model
        (``worker.engine.self_check.batch_for`` makes a batch so). ``prefix_seed``: the
        model's identity for prefix caching, which is off without it."""
        self.model = model
        self.path = path
        self.device = next(model.parameters()).device
        #: A hybrid or state-space model's per-row recurrent state (packed path); else None.
        self.states = None
        #: The cached prefix blocks, where the model is eligible (worker/kv/prefix.py).
        self.prefix: PrefixCache | None = None
        #: The bytes the prefix cache may hold now (the engine sets it from its budget).
        self.prefix_room: Callable[[], int] = lambda: 1 << 62
        #: ``rows[i].index == i``.
        self.rows: list[Row] = []
        if path == "packed":
            recurrent = is_recurrent(model)
            if has_attention(model):
                use_packed_attention(model, recurrent)
            self.states = RecurrentState(model) if recurrent else None
            self.cache = KVCache(self.rows, kv_bytes_per_token(model), self.states.bytes_per_row if self.states else 0)
            if prefix_seed is not None and self.states is None:
                self.prefix = PrefixCache(prefix_seed)
        else:
            loaded_with = getattr(model, "_hive_loaded_attention", None)
            if loaded_with is not None and model.config._attn_implementation != loaded_with:
                model.set_attn_implementation(loaded_with)  # what generate runs
            # Nothing is allocated here (each row's own cache holds its tokens): the
            # reservation only counts, at the sizes the self-check measured.
            self.cache = KVCache(self.rows, *getattr(model, "_hive_own_cache_bytes", (kv_bytes_per_token(model), 0)))
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

    def reserve(self, count: int, tokens: int) -> None:
        """The cache's reservation: ``tokens`` slots, and state for ``count`` sequences
        where the model keeps a recurrent one."""
        self.cache.reserve(tokens)
        if self.states is not None:
            self.states.reserve(count, len(self.rows))

    @property
    def state_rows(self) -> int:
        """The rows a hybrid's recurrent state is reserved for (0 without one)."""
        return self.states.rows if self.states is not None else 0

    @property
    def row_capacity(self) -> int:
        """How many rows the reservation holds (unbounded without a recurrent state)."""
        return self.states.rows if self.states is not None else 1 << 30

    @property
    def allocated_bytes(self) -> int:
        return (self.cache.allocated_bytes + (self.states.allocated_bytes if self.states else 0)
                + (self.prefix.bytes if self.prefix is not None else 0))

    @property
    def reserved_bytes(self) -> int:
        """What the reservation holds: the pool, and a hybrid's state rows."""
        return self.cache.reserved_bytes(rows=self.state_rows)

    @property
    def held_bytes(self) -> int:
        """What the rows' rooms hold (beside a hybrid's per-row state)."""
        return self.cache.held * self.cache.bytes_per_token + len(self.rows) * self.cache.bytes_per_row

    @property
    def used_bytes(self) -> int:
        """What the live tokens hold (beside a hybrid's per-row state)."""
        return sum(row.length for row in self.rows) * self.cache.bytes_per_token + len(self.rows) * self.cache.bytes_per_row

    @property
    def grows(self) -> bool:
        """Whether rows take columns as their tokens arrive (and may be preempted), or
        are reserved at their whole ``max_length`` on joining: the attention-only
        packed path, whose rows a preempted job can recompute from its tokens alone."""
        return self.path == "packed" and self.states is None

    def room_now(self, row: Row) -> int:
        """The slots ``row`` needs in the next step."""
        return max(len(row.prompt_ids), row.length + 1) if self.grows else row.max_length

    def add(self, owner, prompt_ids: list[int], max_length: int, salt: str | None = None, then: int | None = None) -> Row:
        """A row for a newcomer (within the reservation); its prompt is prefilled by
        the next steps' ``forward``. ``salt``: whose cached prefixes it may reuse
        (worker/kv/prefix.py); None: it neither reads nor leaves any. ``then``: a
        preempted job coming back (``Row.then``). Its room grows with its tokens
        (``Batch.grows``), or holds all of them from now."""
        assert len(self.rows) < self.row_capacity
        self._joined += 1
        root = self.prefix.root(salt) if self.prefix is not None and salt is not None else None
        row = Row(owner, prompt_ids, max_length, len(self.rows), self._joined, root=root, tokens=list(prompt_ids), then=then)
        self.rows.append(row)
        self.cache.add(row, 0 if self.grows else max_length)
        return row

    def reuse(self, row: Row) -> int:
        """Copies the cached blocks that continue a prefilling row's prompt into it."""
        return self.prefix.reuse(row, self.cache) if self.prefix is not None else 0

    def remove(self, row: Row) -> None:
        if self.prefix is not None:
            self.prefix.leave(row)
        last = self.rows.pop()
        if last is not row:
            if self.states is not None:
                self.states.move(last.index, row.index)
            last.index = row.index
            self.rows[row.index] = last
        self.cache.release()

    def clear(self) -> None:
        """Every row leaves (the batch failed, or its model is unloaded)."""
        self.rows.clear()
        self.cache.release()

    def feed(self, row: Row, token_id: int) -> None:
        """The token sampled from ``row``'s logits: the next step feeds it."""
        row.next_id = token_id
        row.tokens.append(token_id)

    @torch.inference_mode()
    def forward(self, chunks: dict[Row, int]) -> tuple[list[Row], torch.Tensor]:
        """One pass: every decoding row's next token, and ``chunks[row]`` more prompt
        tokens of prefilling rows. Returns the rows that have a next-token
        distribution now (the decoding ones, then those whose prompt is complete)
        and their logits [rows, vocab]."""
        if self.path == "own":
            return self._forward_own(chunks)
        if self.states is not None:
            return self._forward_recurrent(chunks)
        decoding = [row for row in self.rows if row.next_id is not None]
        self._fit(decoding, chunks)
        ids = [row.next_id for row in decoding]
        positions = [row.length for row in decoding]
        keep = list(range(len(decoding)))
        ready = list(decoding)
        segments = []
        resumed = []
        # Prompts that start now first: packed_attention attends them together.
        for row, n in sorted(chunks.items(), key=lambda item: item[0].length > 0):
            segments.append(Segment(row.start, row.length, n, len(ids)))
            ids.extend(row.prompt_ids[row.length : row.length + n])
            positions.extend(range(row.length, row.length + n))
            if row.length + n == len(row.prompt_ids):
                if row.then is None:
                    keep.append(len(ids) - 1)
                    ready.append(row)
                else:
                    resumed.append(row)
        layout = StepLayout(self.cache, [row.start for row in decoding], [row.length for row in decoding], segments, self.device)
        with layout.active():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
                use_cache=False,
            )
        for row in decoding:
            row.length += 1
        for row, n in chunks.items():
            row.length += n
        for row in resumed:  # back where it was preempted: its next token is known
            self.feed(row, row.then)
            row.then = None
        if self.prefix is not None:
            for row in self.rows:
                self.prefix.publish(row, self.cache, self.prefix_room)
        return ready, out.logits[0]

    def _fit(self, decoding: list[Row], chunks: dict[Row, int]) -> None:
        """Rooms for the step's tokens (the scheduler reserved the slots for them)."""
        needs = {row: row.length + 1 for row in decoding}
        needs.update((row, row.length + n) for row, n in chunks.items())
        self.cache.fit(needs)

    def _forward_recurrent(self, chunks: dict[Row, int]) -> tuple[list[Row], torch.Tensor]:
        """``forward`` for a model with recurrent layers (worker/engine/recurrent_state.py):
        the decoding rows as one batch of one token each, then the prompt chunks
        (one batch per length), every forward with its rows' states."""
        ready, logits = [], []
        decoding = [row for row in self.rows if row.next_id is not None]
        self._fit(decoding, chunks)
        if decoding:
            layout = StepLayout(self.cache, [r.start for r in decoding], [r.length for r in decoding], [], self.device)
            logits.append(self._run(layout, decoding, [[r.next_id] for r in decoding], [[r.length] for r in decoding], True)[:, -1])
            ready.extend(decoding)
            for row in decoding:
                row.length += 1
        # Chunks of one length that all start their prompts (or all continue them) run
        # as one batch: a burst of equal prompts costs one forward, not one each.
        groups: dict[tuple[int, bool], list[Row]] = {}
        for row, n in sorted(chunks.items(), key=lambda item: item[0].joined):
            groups.setdefault((n, row.length > 0), []).append(row)
        for (n, continuing), rows in groups.items():
            segments = [Segment(row.start, row.length, n, k * n) for k, row in enumerate(rows)]
            layout = StepLayout(self.cache, [], [], segments, self.device)
            ids = [row.prompt_ids[row.length : row.length + n] for row in rows]
            out = self._run(layout, rows, ids, [list(range(row.length, row.length + n)) for row in rows], continuing)
            for row, row_logits in zip(rows, out):
                row.length += n
                if row.length == len(row.prompt_ids):
                    logits.append(row_logits[-1:])
                    ready.append(row)
        return ready, torch.cat(logits) if logits else torch.empty(0, device=self.device)

    def _run(self, layout: StepLayout, rows: list[Row], ids: list[list[int]], positions: list[list[int]], continuing: bool) -> torch.Tensor:
        """One forward over ``rows`` (batch-major) with their recurrent states; the logits
        of each row's last token [rows, 1, vocab]."""
        view = self.states.view([row.index for row in rows], continuing, rows[0].length)
        with layout.active():
            out = self.model(
                input_ids=torch.tensor(ids, device=self.device),
                position_ids=torch.tensor(positions, device=self.device),
                logits_to_keep=1,
                use_cache=True,
                **{cache_keyword(self.model): view},
            )
        self.states.keep(view)
        return out.logits

    def _forward_own(self, chunks: dict[Row, int]) -> tuple[list[Row], torch.Tensor]:
        """``forward`` on the "own" path: each decoding row's token, then each prompt
        chunk, through the model's own forward and the row's own cache."""
        ready, logits = [], []
        for row in [row for row in self.rows if row.next_id is not None]:
            logits.append(self._own(row, [row.next_id]))
            ready.append(row)
        for row in sorted(chunks, key=lambda row: row.joined):
            # The whole prompt at once, whatever chunk the scheduler planned: as in
            # generate, since a family on this path may not continue a prompt from its
            # cache as its full forward would (MiniMax's linear attention does not).
            logits.append(self._own(row, row.prompt_ids[row.length :]))
            ready.append(row)
        return ready, torch.cat(logits) if logits else torch.empty(0, device=self.device)

    def _own(self, row: Row, ids: list[int]) -> torch.Tensor:
        """``ids`` through the model with ``row``'s own cache (the model makes it at the
        first call, of its own class, as in ``generate``); the last token's logits [1, vocab]."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1,
                         **{cache_keyword(self.model): row.own_cache})
        row.own_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        row.length += len(ids)
        return out.logits[:, -1]
