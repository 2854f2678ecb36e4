"""Per-row recurrent state for hybrid and state-space models (Qwen 3.5, Qwen3-Next,
Jamba, Bamba, Granite 4, Mamba 1 and 2, LFM2, …): the layers that are not attention
(gated delta nets, Mamba mixers, short convolutions) carry each sequence's past as
a fixed-size state (a conv window, an SSM or recurrent matrix) instead of keys and
values.

Like vLLM v1's hybrid KV-cache manager, which allocates each request's mamba state
beside its paged attention blocks, the batch holds one state slot per row beside
its KV row (``RecurrentState``): per layer and state kind, one pool tensor of shape
[rows, …], row ``r`` for the batch's row ``r``. Rows move with the KV cache's
(compaction when one leaves) and the pools are reserved with it.

The layers' own code computes the states, through the cache interface they share in
transformers (``Cache.get_conv_state``, ``update_conv_state``,
``get_recurrent_state``, ``update_recurrent_state``: every hybrid family in the
installed transformers uses it). For a forward over some rows, ``view`` builds
transformers' own ``DynamicCache`` for the model's layer types and puts those rows'
states in its linear-attention layers; ``keep`` writes them back. So each family's
state handling is transformers' own (what ``generate`` runs), not a copy of it.
The attention layers of that view store nothing: ``update`` hands the new keys and
values on, and Hive's packed attention (worker/engine/packed_attention.py) writes
them into the batch's KV cache.

A recurrent layer mixes every token it is given into one state, so a step cannot
pack several sequences into one row for it as the attention-only step does
(worker/engine/batch.py): the decoding rows run as one batch of shape [rows, 1],
and each prompt chunk as a forward of its own.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin, get_layer_types_and_kwargs

from worker.engine.unsupported import UnsupportedModel

#: Cache layer types that keep a recurrent state (transformers' DYNAMIC_LAYER_TYPE_MAPPING).
RECURRENT_TYPES = {"linear_attention", "conv", "hybrid", "hybrid_sliding"}
#: Cache layer types with keys and values (the rest: recurrent only, or none: "dummy").
ATTENTION_FREE_TYPES = {"linear_attention", "conv", "dummy"}


def text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_types(model) -> list[str]:
    """The cache layer type of each layer, as transformers' DynamicCache builds it."""
    try:
        return get_layer_types_and_kwargs(text_config(model))[0]
    except Exception:  # noqa: BLE001 - a config without per-layer fields: plain attention layers
        return []


def is_recurrent(model) -> bool:
    return any(kind in RECURRENT_TYPES for kind in layer_types(model))


def has_attention(model) -> bool:
    kinds = layer_types(model)
    return not kinds or any(kind not in ATTENTION_FREE_TYPES for kind in kinds)


def cache_keyword(model) -> str:
    """The forward's name for its cache: ``cache`` in current transformers, still
    ``past_key_values`` in families not yet renamed (a cache passed under the other
    name would be silently ignored, every forward starting from an empty state)."""
    if getattr(model, "_hive_cache_keyword", None) is None:  # once: a signature costs more than a decode step's bookkeeping
        model._hive_cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model._hive_cache_keyword


def _passthrough(key_states, value_states, *args, **kwargs):
    """An attention layer's cache update in a view: nothing stored; the packed attention
    writes the keys and values into the batch's KV cache."""
    return key_states, value_states


def _fresh_cache(config) -> DynamicCache:
    """transformers' cache for the model's layer types, its attention parts (attention
    layers, and hybrid layers' attention beside their state) storing nothing."""
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if hasattr(layer, "update"):  # a pure linear-attention layer has none
            layer.update = _passthrough
    return cache


class RecurrentState:
    def __init__(self, model):
        self.config = model.config
        self.device = next(model.parameters()).device
        #: (layer, "conv" | "recurrent", state index) -> [reserved rows, …], allocated at
        #: the first write of that state (its shape comes from the layer's own code).
        self.pools: dict[tuple[int, str, int], torch.Tensor] = {}
        self.rows = 0  # reserved
        self.bytes_per_row = state_bytes_per_row(model)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pools.values())

    @torch.inference_mode()
    def reserve(self, rows: int, used_rows: int) -> None:
        """``rows`` slots, keeping the first ``used_rows``."""
        if rows == self.rows:
            return
        self.rows = rows
        for key, old in list(self.pools.items()):
            if not rows:
                del self.pools[key]
                continue
            new = old.new_zeros((rows, *old.shape[1:]))
            new[:used_rows] = old[:used_rows]
            self.pools[key] = new

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        for pool in self.pools.values():
            pool[target] = pool[source]

    def view(self, rows: list[int], continuing: bool, length: int) -> DynamicCache:
        """A cache for a forward over ``rows`` (in that order): their states where
        ``continuing`` (they have run before), fresh ones otherwise. ``length``: the
        tokens already in the first row (what the model reads as the cache's length)."""
        cache = _fresh_cache(self.config)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        index = None if contiguous else torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.cumulative_length_linear = torch.tensor(length, dtype=torch.long, device=self.device)
        for (number, kind, state), pool in self.pools.items() if continuing else ():
            layer = cache.layers[number]
            # A contiguous run of rows is a view: the layers' in-place updates land
            # in the pool itself; otherwise a copy, written back by ``keep``.
            states = pool[rows[0] : rows[0] + len(rows)] if contiguous else pool.index_select(0, index)
            layer.device, layer.dtype = pool.device, pool.dtype
            if kind == "conv":
                layer.conv_states[state] = states
                layer.conv_kernel_size[state] = states.shape[-1]
                layer.is_conv_states_initialized[state] = True
            else:
                layer.recurrent_states[state] = states
                layer.is_recurrent_states_initialized[state] = True
            layer.has_previous_state[state] = True
        cache._hive_rows = (rows, contiguous)
        return cache

    @torch.inference_mode()
    def keep(self, cache: DynamicCache) -> None:
        """The states the forward left in ``cache`` back into their rows' slots."""
        rows, contiguous = cache._hive_rows
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for number, layer in enumerate(cache.layers):
            if not isinstance(layer, LinearAttentionCacheLayerMixin):
                continue
            for kind, states in (("conv", layer.conv_states), ("recurrent", layer.recurrent_states)):
                for state, tensor in states.items():
                    if tensor is None:
                        continue
                    pool = self.pools.get((number, kind, state))
                    if pool is None:
                        pool = self.pools[(number, kind, state)] = tensor.new_zeros((self.rows, *tensor.shape[1:]))
                    if contiguous and tensor.data_ptr() == pool[rows[0]].data_ptr():
                        continue  # updated in place
                    pool.index_copy_(0, index, tensor)


@torch.inference_mode()
def state_bytes_per_row(model) -> int:
    """The recurrent state one sequence holds in every layer, in bytes: measured from
    the model's own layers (one token through a fresh cache), since each family
    shapes its states its own way (conv windows, SSM heads, gated delta matrices)."""
    if getattr(model, "_hive_state_bytes", None) is None:
        device = next(model.parameters()).device
        cache = _fresh_cache(model.config)
        # Outside a step, the packed attention is plain sdpa over this one token.
        try:
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True, **{cache_keyword(model): cache})
        except Exception as e:  # a family with a cache class of its own (MiniMax): refused, not an error per job
            raise UnsupportedModel(
                f"{type(model).__name__}: its recurrent layers do not keep their state in transformers' shared cache, "
                f"which Hive batches ({type(e).__name__}: {e})"
            ) from e
        total = 0
        for layer in cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                for tensor in (*layer.conv_states.values(), *layer.recurrent_states.values()):
                    if tensor is not None:
                        total += tensor[0].numel() * tensor.element_size()
        model._hive_state_bytes = total
    return model._hive_state_bytes
