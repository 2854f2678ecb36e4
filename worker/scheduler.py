"""Who joins the batch at the next step: one decision, in one place.

A job waits in FIFO order until three things hold: a slot (at most ``max_batch``
sequences), room in the KV-cache budget for the whole batch with it, and the
step's prefill budget. The budget counts what the batch holds at its widest: every
row padded to the longest sequence the batch may reach (``Sequence.max_length``,
the prompt plus its max_tokens) plus the cache's spare columns, at the model's
bytes per token. So a batch never grows past its memory by admitting one job too
many; a job that waits for room is admitted as others end, and one that could not
fit even alone is refused when it arrives (``ContextTooLarge``). Nothing is
preempted.

Prefill: newcomers' prompts are prefilled together when their padded size fits
the step's token budget; a prompt longer than the budget is prefilled in chunks of
that size, one chunk per step, so the running streams keep getting a token every
step (chunked prefill). The budget grows, up to fourfold, while no stream decodes
or while jobs queue up behind the step (``Scheduler.budget``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .batch import SPARE_COLUMNS
from .running import RunningJob


#: How much larger than the base budget a step's prefill may be: with no stream
#: decoding, or with a backlog of BACKLOG_PER_STEP waiting jobs per step of it.
MAX_PREFILL_FACTOR = 4
BACKLOG_PER_STEP = 4


class ContextTooLarge(Exception):
    code = "CONTEXT_TOO_LARGE"


def kv_bytes_per_token(model) -> int:
    """Keys and values of one token in every layer, from the model's config and dtype."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


class Scheduler:
    def __init__(self, max_batch: int, prefill_tokens: int, bytes_per_token: int, kv_budget: Callable[[], int]):
        """``kv_budget``: the bytes the KV cache may take now (the worker's memory
        budget less the models it holds)."""
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.bytes_per_token = bytes_per_token
        self._kv_budget = kv_budget
        self.waiting: deque[RunningJob] = deque()
        #: The prefill budget admit() decided on last (a longer prompt is chunked by it).
        self.step_budget = prefill_tokens

    def footprint(self, jobs: list[RunningJob]) -> int:
        """The most KV-cache bytes these jobs can take together, padded as a batch."""
        if not jobs:
            return 0
        return len(jobs) * (max(j.sequence.max_length for j in jobs) + SPARE_COLUMNS) * self.bytes_per_token

    def check_fits_alone(self, job: RunningJob) -> None:
        need, budget = self.footprint([job]), self._kv_budget()
        if need > budget:
            raise ContextTooLarge(
                f"the prompt ({len(job.sequence.prompt_ids)} tokens) and max_tokens ({job.sequence.max_tokens}) need "
                f"{need / 2**20:.1f} MiB of KV cache; this worker's memory budget leaves {budget / 2**20:.1f} MiB "
                "beside its models (--max-memory): lower max_tokens or shorten the prompt"
            )

    def admit(self, running: list[RunningJob]) -> list[RunningJob]:
        """The waiting jobs, oldest first, that join in one prefill group now (a
        prompt longer than the prefill budget comes alone: it is chunked). The
        oldest waits for room rather than being overtaken."""
        group: list[RunningJob] = []
        budget = self.step_budget = self.budget(len(running))
        while self.waiting and len(running) + len(group) < self.max_batch:
            job = self.waiting[0]
            if self.footprint([*running, *group, job]) > self._kv_budget():
                break
            longest = max(len(j.sequence.prompt_ids) for j in (*group, job))
            if group and longest * (len(group) + 1) > budget:
                break
            group.append(self.waiting.popleft())
            if len(job.sequence.prompt_ids) > budget:
                break  # alone, in chunks
        return group

    def budget(self, running: int) -> int:
        """Prompt tokens to prefill in this step. With no stream running there is no
        inter-token latency to protect, and a backlog (a burst of arrivals) is
        worth larger steps, so that its last newcomer's first token does not wait
        behind many small ones: each forward pass reads every weight once, which on
        the CPU is most of a short prefill's cost. A trickle of arrivals joins in
        small chunks, which the running streams barely notice."""
        if not running:
            return MAX_PREFILL_FACTOR * self.prefill_tokens
        return self.prefill_tokens * min(MAX_PREFILL_FACTOR, 1 + len(self.waiting) // BACKLOG_PER_STEP)
