"""How one sequence picks its next token from its logits row: OpenAI's and
transformers' processing, in the order peers apply it, then sampling.

1. Logprobs are read from the raw row (the model's own distribution, as vLLM's
   default: before bias, penalties, the grammar and temperature).
2. ``logit_bias``, then the penalties: frequency and presence on the tokens
   generated so far (OpenAI's), repetition on the prompt's and the output's
   (transformers' ``RepetitionPenaltyLogitsProcessor``).
3. The grammar's mask (worker/grammar/constraint.py).
4. Temperature, top-k, top-p, and the draw from the sequence's own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    #: (token id, bias) pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.logit_bias)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the last position's (processed) logits (1-D)."""
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


class Penalties:
    """The bias and penalties of one sequence, with the counts they need, kept on
    the logits' device and updated per token (no pass over the history per step)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        self.params = params
        self._counts = torch.zeros(vocab_size, device=device) if params.frequency_penalty or params.presence_penalty else None
        self._seen = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab_size], dtype=torch.long, device=device)
            self._seen[ids] = True
        self._bias = None
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias)
            self._bias = (torch.tensor(ids, device=device), torch.tensor(biases, device=device))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed row (a new float tensor; the batch's logits stay as they are)."""
        logits = logits.float().clone()
        if self._bias is not None:
            logits.index_add_(0, self._bias[0], self._bias[1].to(logits.dtype))
        if self._counts is not None:
            logits -= self.params.frequency_penalty * self._counts + self.params.presence_penalty * (self._counts > 0)
        if self._seen is not None:
            penalty = self.params.repetition_penalty
            seen = logits[self._seen]
            logits[self._seen] = torch.where(seen < 0, seen * penalty, seen / penalty)
        return logits

    def accept(self, token_id: int) -> None:
        if self._counts is not None and token_id < self._counts.numel():
            self._counts[token_id] += 1
        if self._seen is not None and token_id < self._seen.numel():
            self._seen[token_id] = True


def logprob_item(raw: torch.Tensor, token_id: int, top: int, token_bytes) -> dict:
    """OpenAI's ``{token, logprob, bytes, top_logprobs}`` for the sampled token, from
    the raw logits row. ``token_bytes(id)``: the bytes the token stands for."""
    logprobs = torch.log_softmax(raw.float(), dim=-1)

    def entry(token: int, value: float) -> dict:
        data = token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": max(value, -9999.0), "bytes": list(data)}

    item = entry(token_id, float(logprobs[token_id]))
    if top:
        values, ids = torch.topk(logprobs, top)
        item["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
    else:
        item["top_logprobs"] = []
    return item
