"""Who computes what in the next step: one decision, in one place.

Each step has a budget of prompt tokens to prefill beside the running rows'
decode (one token each), as in vLLM's scheduler. The waiting jobs join in FIFO
order while two things hold: a slot (at most ``max_batch`` sequences) and room in
the KV-cache budget. The budget goes to the prefilling prompts, shortest left first; a
prompt longer than what is left is prefilled in chunks over the next steps
(chunked prefill), so the running streams keep getting a token every step.

Memory: the batch's cache is reserved for every row at the widest ``prompt +
max_tokens`` among them (worker/engine/kv_cache.py), and that reservation is what the
budget counts, so a batch never grows past its memory by admitting one job too
many: a job waits for room, FIFO, and is admitted as others end; one that could
not fit even alone is refused when it arrives (``ContextTooLarge``). Nothing is
preempted. Rows are reserved ahead (up to twice the live ones, within
``max_batch`` and the budget), so a burst of newcomers does not reallocate the
cache for each.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.engine.batch import Batch, Row
from worker.engine.kv_cache import round_columns
from worker.engine.running_job import RunningJob

#: How much larger than the base budget a step's prefill may be (``Scheduler.budget``).
MAX_PREFILL_FACTOR = 4
#: Steps a prefilling prompt can be passed over for shorter ones before it goes first.
STARVED_STEPS = 4


class ContextTooLarge(Exception):
    code = "CONTEXT_TOO_LARGE"


class Scheduler:
    def __init__(self, max_batch: int, prefill_tokens: int, kv_budget: Callable[[], int]):
        """``kv_budget``: the bytes this batch's KV cache may take now (the worker's
        memory budget less the models it holds and the other models' batches)."""
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._kv_budget = kv_budget
        self.waiting: deque[RunningJob] = deque()

    def check_fits_alone(self, job: RunningJob, batch: Batch) -> None:
        need, budget = batch.cache.reserved_bytes(1, round_columns(job.sequence.max_length)), self._kv_budget()
        if need > budget:
            raise ContextTooLarge(
                f"the prompt ({len(job.sequence.prompt_ids)} tokens) and max_tokens ({job.sequence.max_tokens}) need "
                f"{need / 2**20:.1f} MiB of KV cache; this worker's memory budget leaves {budget / 2**20:.1f} MiB "
                "beside its models (--max-memory): lower max_tokens or shorten the prompt"
            )

    def plan(self, batch: Batch) -> tuple[list[RunningJob], dict[Row, int]]:
        """The newcomers that join now (added to ``batch``), and the prompt tokens each
        prefilling row computes in this step."""
        joining: list[RunningJob] = []
        widest = max((s.max_length for s in batch.rows), default=0)
        while self.waiting and len(batch) < self.max_batch:
            job = self.waiting[0]
            columns = round_columns(max(widest, job.sequence.max_length))
            rows = len(batch) + 1
            if rows > batch.cache.rows or columns > batch.cache.columns:
                if not self._reserve(batch, rows, columns):
                    break  # the oldest waits for room rather than being overtaken
            widest = columns
            self.waiting.popleft()
            batch.add(job, job.sequence.prompt_ids, job.sequence.max_length)
            joining.append(job)
        # Shortest prompt left first: in a burst, the median first token comes after
        # the short prompts rather than after everything before them in the queue
        # (shortest remaining processing time minimises the mean wait). A prompt
        # passed over STARVED_STEPS times goes first, so a long one always finishes.
        chunks: dict[Row, int] = {}
        prefilling = batch.prefilling
        budget = self.budget(batch.decoding, len(prefilling))
        for row in sorted(prefilling, key=lambda s: (s.passed_over < STARVED_STEPS, s.prompt_left, s.joined)):
            if not budget:
                row.passed_over += 1
                continue
            chunks[row] = n = min(row.prompt_left, budget)
            budget -= n
            row.passed_over = 0
        return joining, chunks

    def _reserve(self, batch: Batch, rows: int, columns: int) -> bool:
        """Grows the batch's reservation to ``rows`` × ``columns`` or more, if the
        budget allows; rows ahead for the next newcomers where it allows that too."""
        budget = self._kv_budget()  # the other batches' reservations are out of it, not this one's
        columns = max(columns, batch.cache.columns)
        ahead = min(self.max_batch, max(rows, 2 * len(batch), rows + len(self.waiting) - 1))
        for candidate in (ahead, rows):
            if batch.cache.reserved_bytes(candidate, columns) <= budget:
                batch.reserve(candidate, columns)
                return True
        return False

    def shrink(self, batch: Batch) -> None:
        """After rows left: gives back a reservation that is more than twice what the
        live rows need (all of it when none is left), for the other models' batches."""
        if not len(batch):
            batch.reserve(0, 0)
            return
        rows = len(batch)
        columns = round_columns(max(s.max_length for s in batch.rows))
        if batch.cache.rows > 2 * rows or batch.cache.columns > 2 * columns:
            batch.reserve(rows, columns)

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
