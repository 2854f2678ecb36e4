"""One job's generation state, apart from the batch it runs in: its sampling (with
its own seeded generator), its text (incremental decoding, stop sequences) and its
limits (max_tokens, EOS, the model's context).

The engine hands each step's logits row to ``Sequence.sample`` and the sampled id to
``Sequence.accept``; nothing here depends on what else is in the batch, so a job's
text is what it would be alone (up to the batch's floating-point sums).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shared.events import ToolCallDelta
from worker.engine.sampling import Penalties, SamplingParams, logprob_item, sample_next
from worker.engine.textstream import IncrementalDecoder, StopMatcher
from worker.grammar.constraint import Constraint, token_bytes
from worker.grammar.tool_call_stream import ToolCallStream

__all__ = ["PromptTooLong", "SamplingParams", "Sequence", "Step", "eos_ids", "generate_alone"]


class PromptTooLong(Exception):
    code = "PROMPT_TOO_LONG"


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class Step:
    """What one sampled token gives the job: the text that became final with it,
    the tool-call parts it completed, its logprobs when asked for, and on its last
    token why it stopped (max_tokens | eos | stop_sequence | tool_calls)."""

    i: int
    text: str
    stop_reason: str | None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: dict | None = None


class Sequence:
    """``constraint``: the job's grammar, if any; ``tool_calls``: reads calls out of
    the answer, when the job may make them."""

    def __init__(
        self,
        model,
        tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        stop_ids: frozenset[int],
        constraint: Constraint | None = None,
        tool_calls: ToolCallStream | None = None,
    ):
        limit = context_length(model)
        if limit is not None and len(prompt_ids) >= limit:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = params.max_tokens if limit is None else min(params.max_tokens, limit - len(prompt_ids))
        self.generator: torch.Generator | None = None
        if not params.greedy:
            device = next(model.parameters()).device
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        self._tokenizer = tokenizer
        self._stop_ids = stop_ids
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self._stops = StopMatcher(list(params.stop))
        self.constraint = constraint
        self.tool_calls = tool_calls
        self._penalties: Penalties | None = None
        self._logprobs: dict | None = None
        #: Tokens sampled so far.
        self.count = 0

    @property
    def max_length(self) -> int:
        """The most tokens this sequence can hold in the KV cache: its reservation."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def plain(self) -> bool:
        """Greedy with nothing to process: the batch's one argmax is its token."""
        params = self.params
        return params.greedy and self.constraint is None and not params.penalized and not params.logprobs

    def sample(self, logits: torch.Tensor, masked: torch.Tensor | None = None) -> int:
        """The next token from this sequence's logits row (1-D), processed as
        worker/engine/sampling.py orders it; ``masked``: the row with the grammar's
        mask already applied (the engine masks its rows together). Penalties after
        the mask give what they would before it: a forbidden token stays -inf."""
        params = self.params
        raw = logits
        if self.constraint is not None and masked is None:
            masked = logits.float().clone()
            self.constraint.allowed(masked)
        if masked is not None:
            logits = masked
        if params.penalized:
            if self._penalties is None:
                self._penalties = Penalties(params, self.prompt_ids, logits.shape[-1], logits.device)
            logits = self._penalties.apply(logits)
        token_id = sample_next(logits, params, self.generator)
        if params.logprobs:
            self._logprobs = logprob_item(raw, token_id, params.top_logprobs, lambda t: token_bytes(self._tokenizer, t))
        return token_id

    def accept(self, token_id: int) -> Step:
        """The sampled ``token_id``'s text, and whether the sequence ends with it."""
        i = self.count
        self.count += 1
        logprobs, self._logprobs = self._logprobs, None
        is_eos = token_id in self._stop_ids
        if self._penalties is not None:
            self._penalties.accept(token_id)
        finished = False
        if self.constraint is not None and not is_eos:
            self.constraint.accept(token_id)
            finished = self.constraint.finished
        last = is_eos or finished or self.count >= self.max_tokens
        delta = "" if is_eos else self._decoder.push(token_id)
        if last:
            delta += self._decoder.flush()
        calls: tuple[ToolCallDelta, ...] = ()
        if self.tool_calls is not None:
            delta, deltas = self.tool_calls.feed(delta, final=last)
            calls = tuple(deltas)
        text, hit_stop = self._stops.feed(delta, final=last)
        if hit_stop:
            return Step(i, text, "stop_sequence", calls, logprobs)
        if last:
            if self.tool_calls is not None and self.tool_calls.calls and (is_eos or finished):
                return Step(i, text, "tool_calls", calls, logprobs)
            return Step(i, text, "eos" if is_eos or finished else "max_tokens", calls, logprobs)
        return Step(i, text, None, calls, logprobs)


def generate_alone(model, tokenizer, prompt_ids: list[int], params: SamplingParams) -> Iterator[Step]:
    """One sequence on its own, through the engine's batch as a batch of one,
    without Redis: the in-process side of the benchmarks, and what a test compares
    a batched job against."""
    from worker.engine.self_check import batch_for

    sequence = Sequence(model, tokenizer, prompt_ids, params, eos_ids(model, tokenizer))
    batch = batch_for(model)
    batch.reserve(1, sequence.max_length)
    row = batch.add(sequence, prompt_ids, sequence.max_length)
    _, logits = batch.forward({row: len(prompt_ids)})
    while True:
        token_id = sequence.sample(logits[0])
        step = sequence.accept(token_id)
        yield step
        if step.stop_reason:
            return
        batch.feed(row, token_id)
        _, logits = batch.forward({})
