"""The self-check a model passes before its first batch: which path of
worker/engine/batch.py gives the model's own logits, or a refusal.

Two prompts (14 and 34 tokens) are prefilled together, then decoded for eight
steps, each position against the model's plain forward (eager attention, else
sdpa) over the whole sequence, fed the same (the model's own greedy) tokens. The
packed path is tried first, then the model's own cache per row; the first whose
every logit vector has a cosine of SAME_LOGITS_COSINE or more with the model's own
serves. A refusal (UNSUPPORTED_MODEL) is left only where neither does, or where
the model's own forward fails: a refusal beats a wrong answer, and a correct slower
path beats a refusal.
"""

from __future__ import annotations

import torch

from worker.engine.batch import PATHS, Batch
from worker.engine.recurrent_state import has_attention, text_config
from worker.engine.unsupported import UnsupportedModel
from worker.kv.cache import round_tokens

#: The bar: measured on tiny random models, 0.99999+ on the path that is right for a
#: family (float32 and bfloat16 alike); 0.07 for MiniMax on the packed path, whose
#: linear-attention layers keep their state in a cache class of their own.
SAME_LOGITS_COSINE = 0.99
#: The prompts (prefilled together) and decode steps.
PROBE_LENGTHS = (14, 34)
PROBE_STEPS = 8


def batch_for(model, prefix_seed: str | None = None) -> Batch:
    """A batch for ``model`` on its path; raises UnsupportedModel where none serves it.
    ``prefix_seed``: the model's identity, for a prefix cache where the path allows one."""
    return Batch(model, batch_path(model), prefix_seed)


@torch.inference_mode()
def batch_path(model) -> str:
    """The path the model's batches take (checked once per model)."""
    if getattr(model, "_hive_path", None) is None:
        model._hive_path = _check(model)
    return model._hive_path


def _check(model) -> str:
    prompts = [[(3 + 7 * k) % text_config(model).vocab_size for k in range(n)] for n in PROBE_LENGTHS]
    attention = has_attention(model)
    # The reference is the model's forward with the attention it was loaded with, as
    # generate runs it (MiMo-V2-Flash's eager and sdpa paths answer differently);
    # where that fails, eager (the plainest), then sdpa.
    loaded_with = model.config._attn_implementation
    model._hive_loaded_attention = loaded_with
    for implementation in dict.fromkeys((loaded_with, "eager", "sdpa")) if attention else (None,):
        try:
            own_logits, sequences = own_greedy(model, prompts, PROBE_STEPS, implementation)
            break
        except Exception as e:  # noqa: BLE001 - tried with the next implementation, or refused below
            failure = e
    else:
        raise UnsupportedModel(f"{type(model).__name__}: its own forward fails in Hive's self-check ({type(failure).__name__}: {failure})") from failure
    why = {}
    for path in PATHS:
        try:
            batch = Batch(model, path)
            worst = _cosine(batch, prompts, sequences, own_logits)
        except UnsupportedModel as e:
            why[path] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - this path fails on this architecture: the next, or refused
            why[path] = f"fails ({type(e).__name__}: {e})"
            continue
        if worst >= SAME_LOGITS_COSINE:
            if path == "own":
                model._hive_own_cache_bytes = _own_cache_bytes(batch)
            return path
        why[path] = f"does not give the model's own logits (cosine {worst:.2f})"
    raise UnsupportedModel(f"{type(model).__name__}: no batching path of Hive's gives the model's own logits: "
                           + "; ".join(f"{path}: {reason}" for path, reason in why.items()))


def _cosine(batch: Batch, prompts, sequences, own_logits) -> float:
    """The lowest cosine of the batch's logits and the model's own."""
    batch.reserve(len(prompts), len(prompts) * round_tokens(max(PROBE_LENGTHS) + PROBE_STEPS))
    chunks = {batch.add(k, prompt, len(prompt) + PROBE_STEPS): len(prompt) for k, prompt in enumerate(prompts)}
    worst = 1.0
    for step in range(PROBE_STEPS):
        ready, logits = batch.forward(chunks)
        chunks = {}
        for row, batched in zip(ready, logits):
            own = own_logits[row.owner][step]
            worst = min(worst, float(torch.nn.functional.cosine_similarity(batched.float(), own, dim=0)))
            batch.feed(row, sequences[row.owner][len(prompts[row.owner]) + step])
    return worst


def own_greedy(model, prompts, steps, implementation: str | None) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """The reference: the model's own logits at each position (its plain forward over the
    whole sequence, with attention ``implementation``), greedy, and the sequences it makes."""
    if implementation is not None and implementation != model.config._attn_implementation:
        model.set_attn_implementation(implementation)
    device = next(model.parameters()).device
    own_logits, sequences = [], []
    for prompt in prompts:
        sequence, logits = list(prompt), []
        for _ in range(steps):
            logits.append(model(input_ids=torch.tensor([sequence], device=device), use_cache=False).logits[0, -1].float())
            sequence.append(int(logits[-1].argmax()))
        own_logits.append(logits)
        sequences.append(sequence)
    return own_logits, sequences


def _own_cache_bytes(batch: Batch) -> tuple[int, int]:
    """Bytes per token and per row of the model's own cache, from the two probe rows'
    (their lengths differ): what the memory budget counts on the "own" path, whatever
    the cache's class holds (keys and values, MiniMax's linear-attention state)."""
    (short, short_bytes), (long, long_bytes) = sorted((row.length, _tensor_bytes(row.own_cache)) for row in batch.rows)
    per_token = max(0, (long_bytes - short_bytes) // (long - short))
    return per_token, max(0, short_bytes - per_token * short)


def _tensor_bytes(value, seen: set[int] | None = None, depth: int = 0) -> int:
    """The bytes of every tensor reachable from ``value`` (a cache object: its layers,
    their lists and dicts of tensors), each counted once."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth > 6:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        children = vars(value).values()
    else:
        return 0
    return sum(_tensor_bytes(child, seen, depth + 1) for child in children)
