"""Embeddings: a model's last hidden states pooled into one vector per input, as the
model declares it, then L2-normalized (as OpenAI's are).

sentence-transformers declares an embedding model's pipeline in ``modules.json``: a
Transformer, a Pooling (its modes in ``1_Pooling/config.json``), often a Normalize.
Hive runs that pipeline when it holds only those modules; any other (a Dense
projection, say) is refused, since a vector without it would be wrong. Its
``sentence_bert_config.json`` gives the sequence length and lower-casing, and
``config_sentence_transformers.json`` a default prompt, prepended as
sentence-transformers does. A model without ``modules.json``: mean pooling over the
attention mask.

Each input is truncated to the model's sequence length (the declared
``max_seq_length``, the tokenizer's ``model_max_length``, the config's
``max_position_embeddings``: the smallest), as sentence-transformers does; the
usage counts the tokens that went in. The inputs go through the model's base
(without its language-model head) longest first, in right-padded batches of at most
BATCH_TOKENS tokens: a real token never attends to a pad, whichever the attention.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.unsupported import UnsupportedModel

#: Padded tokens in one forward (rows × the longest row).
BATCH_TOKENS = 16_384
#: sentence-transformers' pooling modes, in the order it concatenates them, and the
#: key of each in its Pooling config.
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
#: The sentence-transformers modules Hive runs (Normalize: every vector is normalized anyway).
KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


class InvalidEmbeddingRequest(Exception):
    code = "INVALID_REQUEST"


@dataclass(frozen=True)
class Pooling:
    """How a model's hidden states become its embedding, as its files declare it."""

    modes: tuple[str, ...] = ("mean",)
    #: sentence_bert_config.json's ``max_seq_length`` (None: not declared).
    max_length: int | None = None
    lowercase: bool = False
    #: Prepended to every input (the declared default prompt).
    prompt: str = ""


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise UnsupportedModel(f"{path.name} is not valid JSON: {e}") from e


@functools.lru_cache(maxsize=64)
def read_pooling(folder: Path | None) -> Pooling:
    """The model's pooling, from the sentence-transformers files in its snapshot
    folder (immutable, hence cached); mean pooling where it declares none."""
    if folder is None:
        return Pooling()
    modules = _json(folder / "modules.json")
    if not modules:
        return Pooling()
    modes: tuple[str, ...] = ("mean",)
    include_prompt = True
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        name = kind.rsplit(".", 1)[-1]
        if not kind.startswith("sentence_transformers.") or name not in KNOWN_MODULES:
            raise UnsupportedModel(f"its sentence-transformers pipeline has a {kind} module, which Hive does not run (only {sorted(KNOWN_MODULES)})")
        if name == "Pooling":
            config = _json(folder / str(module.get("path", "")) / "config.json")
            modes = tuple(mode for mode, key in POOLING_KEYS.items() if config.get(key))
            if not modes:
                raise UnsupportedModel(f"{module.get('path')}/config.json declares no pooling mode Hive knows ({sorted(POOLING_KEYS)})")
            include_prompt = config.get("include_prompt", True)
    declared = _json(folder / "sentence_bert_config.json")
    prompts = _json(folder / "config_sentence_transformers.json")
    prompt = (prompts.get("prompts") or {}).get(prompts.get("default_prompt_name") or "", "")
    if prompt and not include_prompt:
        raise UnsupportedModel("its pooling leaves its default prompt out (include_prompt: false), which Hive does not do")
    max_length = declared.get("max_seq_length")
    return Pooling(modes, max_length if isinstance(max_length, int) and max_length > 0 else None, bool(declared.get("do_lower_case")), prompt)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """``(rows, dim × len(modes))`` from ``hidden`` ``(rows, width, dim)`` and the
    right-padded attention ``mask`` ``(rows, width)``, as sentence-transformers pools."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    count = weights.sum(1).clamp(min=1e-9)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(weights == 0, -1e9).amax(1))
        elif mode == "mean":
            parts.append((hidden * weights).sum(1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * weights).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            by_position = weights * positions.view(1, -1, 1)
            parts.append((hidden * by_position).sum(1) / by_position.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            last = mask.sum(1).long() - 1
            parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(parts, dim=1)


def normalized(vectors: torch.Tensor, dimensions: int | None = None) -> torch.Tensor:
    """L2-normalized; with ``dimensions``, the first that many of each, normalized
    again (Matryoshka truncation, as OpenAI's ``dimensions``)."""
    vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    if dimensions is None:
        return vectors
    if dimensions > vectors.shape[1]:
        raise InvalidEmbeddingRequest(f"dimensions: {dimensions} is more than this model's {vectors.shape[1]}")
    return torch.nn.functional.normalize(vectors[:, :dimensions], p=2, dim=1)


def sequence_limit(model, tokenizer, pooling: Pooling) -> int | None:
    """The most tokens of one input: the smallest the model's files declare, None if none does."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    limits = [
        pooling.max_length,
        tokenizer_max if isinstance(tokenizer_max, int) and tokenizer_max < 1_000_000 else None,  # transformers' "none" is 1e30
        getattr(config, "max_position_embeddings", None),
    ]
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """The inputs' indices, longest first, cut into batches of at most ``budget``
    padded tokens (a longer input goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@functools.lru_cache(maxsize=16)
def _takes_use_cache(forward_type: type) -> bool:
    return "use_cache" in inspect.signature(forward_type.forward).parameters


@dataclass(frozen=True)
class Embeddings:
    #: ``(inputs, dim)`` float32 on the CPU, each row of norm 1.
    vectors: torch.Tensor
    prompt_tokens: int


@torch.inference_mode()
def embed(
    model,
    tokenizer,
    folder: Path | None,
    texts: list[str],
    device: torch.device,
    dimensions: int | None = None,
    check: Callable[[], None] = lambda: None,
) -> Embeddings:
    """One normalized vector per text, in their order. ``check`` runs between batches
    (a cancel stops there)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{type(model).__name__} is an encoder-decoder: Hive embeds with encoders and decoders only")
    pooling = read_pooling(folder)
    limit = sequence_limit(model, tokenizer, pooling)
    inputs = [pooling.prompt + (text.lower() if pooling.lowercase else text) for text in texts]
    encoded = tokenizer(inputs, truncation=limit is not None, max_length=limit)["input_ids"]
    for i, ids in enumerate(encoded):
        if not ids:
            raise InvalidEmbeddingRequest(f"input {i} encodes to no tokens")
    base = getattr(model, "base_model", model)
    extra = {"use_cache": False} if _takes_use_cache(type(base)) else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[torch.Tensor | None] = [None] * len(texts)
    for batch in batches([len(ids) for ids in encoded]):
        check()
        width = len(encoded[batch[0]])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        output = base(input_ids=input_ids, attention_mask=mask, **extra)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        pooled = pool(hidden.float(), mask, pooling.modes).cpu()
        for r, i in enumerate(batch):
            rows[i] = pooled[r]
    vectors = normalized(torch.stack(rows), dimensions)  # type: ignore[arg-type]
    if not math.isfinite(float(vectors.abs().sum())):
        raise FloatingPointError("the model's hidden states are not finite for these inputs")
    return Embeddings(vectors.contiguous(), sum(len(ids) for ids in encoded))
