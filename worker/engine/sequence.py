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

from worker.engine.textstream import IncrementalDecoder, StopMatcher


class PromptTooLong(Exception):
    code = "PROMPT_TOO_LONG"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits (1-D)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


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
    and on its last token why it stopped (max_tokens | eos | stop_sequence)."""

    i: int
    text: str
    stop_reason: str | None


class Sequence:
    def __init__(self, model, tokenizer, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]):
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
        self._stop_ids = stop_ids
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self._stops = StopMatcher(list(params.stop))
        #: Tokens sampled so far.
        self.count = 0

    @property
    def max_length(self) -> int:
        """The most tokens this sequence can hold in the KV cache: its reservation."""
        return len(self.prompt_ids) + self.max_tokens

    def sample(self, logits: torch.Tensor) -> int:
        return sample_next(logits, self.params, self.generator)

    def accept(self, token_id: int) -> Step:
        """The sampled ``token_id``'s text, and whether the sequence ends with it."""
        i = self.count
        self.count += 1
        is_eos = token_id in self._stop_ids
        last = is_eos or self.count >= self.max_tokens
        delta = "" if is_eos else self._decoder.push(token_id)
        if last:
            delta += self._decoder.flush()
        text, hit_stop = self._stops.feed(delta, final=last)
        if hit_stop:
            return Step(i, text, "stop_sequence")
        if last:
            return Step(i, text, "eos" if is_eos else "max_tokens")
        return Step(i, text, None)


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
