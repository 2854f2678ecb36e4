"""Who computes what in the next step: one decision, in one place.

Each step has a budget of prompt tokens to prefill beside the running rows'
decode (one token each), as in vLLM's scheduler. The waiting jobs join in FIFO
order while two things hold: a slot (at most ``max_batch`` sequences) and room in
the KV-cache budget. The budget goes to the prefilling prompts, shortest left first; a
prompt longer than what is left is prefilled in chunks over the next steps
(chunked prefill), so the running streams keep getting a token every step.

Memory: the batch's cache is a pool of token slots in which each sequence holds a
room of whole blocks (worker/kv/cache.py); the pool is what the budget counts.
On the attention-only packed path (``Batch.grows``) a room grows as its tokens
arrive: a newcomer is admitted, FIFO, when its prompt and a watermark fit, and
when the rows' next tokens do not fit, the newest row is preempted and its job
recomputed later from its tokens (``_grow``), as vLLM does. Hybrids and the "own"
path hold each row's whole ``prompt + max_tokens`` from joining and are never
preempted. A job that could not fit even alone is refused when it arrives
(``ContextTooLarge``). The pool is reserved ahead (for up to twice the live rows,
within ``max_batch`` and the budget), so a burst of newcomers does not reallocate
it for each. The prefix cache holds what the pool leaves of the budget and gives
it back, least recently used first, when the rows need it.

Prefix reuse: before its chunk, a prefilling row copies what the prefix cache holds
of its prompt (so it needs fewer tokens and goes earlier), and a row whose next
block an older row is computing waits for it (``_reuse``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.engine.batch import Batch, Row
from worker.engine.running_job import RunningJob
from worker.kv.cache import round_tokens

#: How much larger than the base budget a step's prefill may be (``Scheduler.budget``).
MAX_PREFILL_FACTOR = 4
#: Steps a prefilling prompt can be passed over for shorter ones before it goes first.
STARVED_STEPS = 4
#: Slots a newcomer needs beyond its prompt to be admitted, so that the batch can
#: decode a while before it must grow (or preempt): vLLM's watermark, in tokens.
WATERMARK_TOKENS = 16


class ContextTooLarge(Exception):
    code = "CONTEXT_TOO_LARGE"


class Scheduler:
    def __init__(self, max_batch: int, prefill_tokens: int, kv_budget: Callable[[], int],
                 reclaim: Callable[[int], int] = lambda nbytes: 0):
        """``kv_budget``: the bytes this batch's KV cache may take now (the worker's
        memory budget less the models it holds and the other models' batches);
        ``reclaim``: frees other models' cached prefix blocks (bytes wanted → freed)."""
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._kv_budget = kv_budget
        self._reclaim = reclaim
        #: Rows preempted so far (a Prometheus counter).
        self.preempted = 0
        self.waiting: deque[RunningJob] = deque()

    def check_fits_alone(self, job: RunningJob, batch: Batch) -> None:
        need, budget = batch.cache.reserved_bytes(round_tokens(job.sequence.max_length), 1), self._kv_budget()
        if need > budget:
            raise ContextTooLarge(
                f"the prompt ({len(job.sequence.prompt_ids)} tokens) and max_tokens ({job.sequence.max_tokens}) need "
                f"{need / 2**20:.1f} MiB of KV cache; this worker's memory budget leaves {budget / 2**20:.1f} MiB "
                "beside its models (--max-memory): lower max_tokens or shorten the prompt"
            )

    def plan(self, batch: Batch) -> tuple[list[RunningJob], dict[Row, int]]:
        """The newcomers that join now (added to ``batch``), and the prompt tokens each
        prefilling row computes in this step. Rows may be preempted first (``_grow``)."""
        self._grow(batch)
        joining: list[RunningJob] = []
        held = self.committed(batch)
        while self.waiting and len(batch) < self.max_batch:
            job = self.waiting[0]
            prompt, then = job.resume or (job.sequence.prompt_ids, None)
            need = round_tokens(len(prompt) + 1 + WATERMARK_TOKENS if batch.grows else job.sequence.max_length)
            rows = len(batch) + 1
            if rows > batch.row_capacity or held + need > batch.cache.capacity:
                if not self._reserve(batch, rows, held + need):
                    break  # the oldest waits for room rather than being overtaken
            held += need
            self.waiting.popleft()
            row = batch.add(job, prompt, job.sequence.max_length, job.cache_salt, then)
            if job.row is None:
                job.row = row  # its first row: what its prompt found cached
            job.resume = None
            joining.append(job)
        prefilling = batch.prefilling
        waiting_for_leader = self._reuse(batch, prefilling)
        # Shortest prompt left first: in a burst, the median first token comes after
        # the short prompts rather than after everything before them in the queue
        # (shortest remaining processing time minimises the mean wait), and a prompt
        # mostly found in the prefix cache goes before one that is not. A prompt
        # passed over STARVED_STEPS times goes first, so a long one always finishes.
        chunks: dict[Row, int] = {}
        budget = self.budget(batch.decoding, len(prefilling))
        for row in sorted(prefilling, key=lambda s: (s.passed_over < STARVED_STEPS, s.prompt_left, s.joined)):
            if row in waiting_for_leader:
                continue
            if not budget:
                row.passed_over += 1
                continue
            chunks[row] = n = min(row.prompt_left, budget)
            budget -= n
            row.passed_over = 0
        return joining, chunks

    @staticmethod
    def committed(batch: Batch) -> int:
        """The slots the rows hold or need for their next tokens, whichever is more."""
        return sum(max(row.room, round_tokens(batch.room_now(row))) for row in batch.rows)

    def _grow(self, batch: Batch) -> None:
        """Grows the pool for the rows' next tokens. Where the budget cannot (even once
        cached prefix blocks are dropped), the newest row is preempted: it leaves, and
        its job goes back to the front of the queue with the tokens it had, to be
        recomputed when there is room (mostly found in the prefix cache then). Its
        client sees a pause, never an error or a token twice."""
        while batch.rows:
            needed = self.committed(batch)
            if needed <= batch.cache.capacity:
                return
            # A quarter more than needed: one reallocation every few dozen tokens.
            for tokens in (max(needed, batch.cache.capacity * 5 // 4), needed):
                if self._room_for(batch, batch.cache.reserved_bytes(tokens, len(batch)), evict=True):
                    batch.reserve(len(batch), tokens)
                    return
            self._preempt(batch, max(batch.rows, key=lambda row: row.joined))

    def _preempt(self, batch: Batch, row: Row) -> None:
        job = row.owner
        if row.next_id is None:  # still prefilling: it starts over (a resumed one, with its own tokens)
            job.resume = (row.prompt_ids, row.then)
        else:
            job.resume = (row.tokens[: row.length], row.next_id)
        job.phase = "waiting"
        batch.remove(row)
        self.waiting.appendleft(job)
        self.preempted += 1

    @staticmethod
    def _reuse(batch: Batch, prefilling: list[Row]) -> set[Row]:
        """Prefilling rows take what the prefix cache holds of their prompts
        (worker/kv/prefix.py). Returns the rows that wait a step instead:
        those whose next block an older row is about to compute, so that a burst
        sharing an uncached prefix computes it once (the older row's blocks are kept
        as they fill, and the others find them at a later step)."""
        if batch.prefix is None:
            return set()
        computing: set[int] = set()
        waiting: set[Row] = set()
        for row in prefilling:  # oldest first
            batch.reuse(row)
            block = batch.prefix.next_block(row)
            if block is None:
                continue
            if block in computing:
                waiting.add(row)
            else:
                computing.add(block)
        return waiting

    def _reserve(self, batch: Batch, rows: int, tokens: int) -> bool:
        """Grows the batch's reservation to ``rows`` rows and ``tokens`` slots or more,
        if the budget allows; ahead for the next newcomers (at the rows' mean need)
        where it allows that without dropping cached prefix blocks."""
        tokens = max(tokens, batch.cache.capacity)
        ahead = min(self.max_batch, max(rows, 2 * len(batch), rows + len(self.waiting) - 1))
        for count, slots, evict in ((ahead, max(tokens * ahead // rows, batch.cache.capacity * 5 // 4), False),
                                    (rows, tokens, True)):
            if self._room_for(batch, batch.cache.reserved_bytes(slots, count), evict):
                batch.reserve(max(count, batch.state_rows), slots)
                return True
        return False

    def _room_for(self, batch: Batch, need: int, evict: bool) -> bool:
        """Whether the budget holds a reservation of ``need`` bytes beside the prefix
        cache, or (``evict``) once least recently used blocks are dropped."""
        budget = self._kv_budget()  # the other batches' reservations are out of it, not this one's
        held = batch.prefix.bytes if batch.prefix is not None else 0
        if need + held <= budget:
            return True
        if not evict:
            return False
        if need > budget:  # other models' cached blocks go first, then this one's
            budget += self._reclaim(need - budget)
            if need > budget:
                return False
        if held:
            batch.prefix.evict(need + held - budget)
        return True

    def shrink(self, batch: Batch) -> None:
        """After rows left: gives back a reservation that is more than twice what the
        live rows need (all of it when none is left), for the other models' batches."""
        if not len(batch):
            batch.reserve(0, 0)
            return
        rows, held = len(batch), self.committed(batch)
        if batch.state_rows > 2 * rows or batch.cache.capacity > 2 * held:
            batch.reserve(rows, held + held // 4)

    def budget(self, decoding: int, prefilling: int) -> int:
        """Prompt tokens to prefill in this step, beside ``decoding`` streams, with
        ``prefilling`` jobs admitted and not yet at their first token. Each prefilled
        token delays the streams' next one; each step that prefills too little
        delays the first token of everyone waiting. So the budget grows with the
        jobs waiting for a first token per stream decoding, up to MAX_PREFILL_FACTOR
        times: a trickle of arrivals joins a busy batch in small chunks, which its
        streams barely notice (the inter-token p99 in bench/batching.py), and a
        burst is prefilled in few large steps, as with nothing decoding."""
        waiting = len(self.waiting) + prefilling
        if not decoding:
            return MAX_PREFILL_FACTOR * self.prefill_tokens
        return self.prefill_tokens * min(MAX_PREFILL_FACTOR, 1 + waiting // decoding)
