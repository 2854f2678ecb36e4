"""Token-by-token generation with a KV cache, per-request sampling and stop sequences.

A plain decode loop rather than ``model.generate``: every token has to leave this
function the moment it exists (``generate`` would need a streamer thread), and the
loop is where per-token checks belong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .textstream import IncrementalDecoder, StopMatcher


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


@dataclass(frozen=True)
class GeneratedToken:
    i: int
    text: str
    #: Set on the last token: max_tokens | eos | stop_sequence.
    stop_reason: str | None


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


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate_tokens(model, tokenizer, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
    """Yields each generated token with the text that became final with it.

    Every generated token yields exactly one item, the last one (an EOS, the token
    completing a stop sequence, or the max_tokens-th) carrying ``stop_reason``.
    """
    from transformers import DynamicCache

    limit = context_length(model)
    if limit is not None and len(prompt_ids) >= limit:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    max_tokens = params.max_tokens if limit is None else min(params.max_tokens, limit - len(prompt_ids))

    device = next(model.parameters()).device
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
    stop_ids = eos_ids(model, tokenizer)
    decoder = IncrementalDecoder(tokenizer, prompt_ids)
    stops = StopMatcher(list(params.stop))
    cache = DynamicCache()
    input_ids = torch.tensor([prompt_ids], device=device)

    with torch.inference_mode():
        for i in range(max_tokens):
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            token_id = sample_next(out.logits[0, -1], params, generator)
            is_eos = token_id in stop_ids
            last = is_eos or i == max_tokens - 1
            delta = "" if is_eos else decoder.push(token_id)
            if last:
                delta += decoder.flush()
            text, hit_stop = stops.feed(delta, final=last)
            if hit_stop:
                yield GeneratedToken(i, text, "stop_sequence")
                return
            if last:
                yield GeneratedToken(i, text, "eos" if is_eos else "max_tokens")
                return
            yield GeneratedToken(i, text, None)
            input_ids = torch.tensor([[token_id]], device=device)
