"""Layer-by-layer loading: build the model empty, then place the safetensors weights
on the device one decoder layer at a time, reporting after each layer.

transformers' ``from_pretrained`` loads everything in one call with no hook per
layer; accelerate gives the two pieces we need (``init_empty_weights`` and
``set_module_tensor_to_device``) and this module orders the work by layer.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("worker.loader")


class LoadError(Exception):
    """The checkpoint cannot be loaded by this loader (code: LOAD_FAILED)."""

    code = "LOAD_FAILED"


class NeedsConversion(LoadError):
    """The checkpoint's names do not match the model's: load it with from_pretrained."""


@dataclass(frozen=True)
class LayerProgress:
    layers_loaded: int
    layers_total: int
    vram_mb: float
    device: str


#: Held while a model is built and while its weights are tied. accelerate's
#: init_empty_weights patches torch.nn.Module for the whole process, transformers'
#: no_init_weights sets a process-wide flag, and tying reads state that building
#: writes: two jobs loading models at once on one worker's threads broke each other,
#: and every later load of the worker too (114 of 150 jobs of a soak over 60 cold
#: models ended LOAD_FAILED, "checkpoint has no weights for … lm_head.weight"; 18 of
#: 24 loads on 8 threads in process, 0 with this lock). Placing the weights, the long
#: part, stays concurrent.
BUILDING = threading.Lock()


def resolve_dtype(name: str, device: torch.device, config) -> torch.dtype:
    """``auto``: the checkpoint's half precision on CUDA, float32 on CPU (where
    bf16 matmuls are slow and fp16 ones unsupported by some kernels)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored in (torch.float16, torch.bfloat16):
        return stored
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def model_class(config):
    """The auto class a checkpoint loads with: AutoModelForCausalLM, unless the
    checkpoint is a bare model, whose ``architectures`` name no head (``BertModel``,
    ``MistralModel``: what embedding models ship), or its family has no causal-LM
    class (MPNet): AutoModel. Such a model serves embeddings only (worker/runtime.py)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    architectures = getattr(config, "architectures", None) or []
    if architectures and all(name.endswith("Model") and "LMHead" not in name for name in architectures):
        return AutoModel
    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name → the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise LoadError(f"no safetensors weights in {model_dir.name}")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _decoder_layers_prefix(model, num_layers: int) -> str:
    """The qualified name of the ModuleList holding the decoder layers
    (``model.layers`` for Llama/Qwen/Mistral, ``transformer.h`` for GPT-2, ...)."""
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
    ]
    if not candidates:
        raise LoadError(f"found no list of {num_layers} decoder layers in {type(model).__name__}")
    return min(candidates, key=len)


def _map_names(checkpoint_names, model_names: set[str], base_prefix: str) -> dict[str, str]:
    """Checkpoint name → parameter name, tolerating the base-model prefix being
    present in one and absent in the other (old GPT-2 checkpoints, for example)."""
    mapping = {}
    for name in checkpoint_names:
        for candidate in (name, f"{base_prefix}.{name}", name.removeprefix(f"{base_prefix}.")):
            if candidate in model_names:
                mapping[name] = candidate
                break
    return mapping


def _tied_output_names(model, config) -> set[str]:
    """The output head's weight when it is tied to the input embeddings (absent from the checkpoint)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = model.get_output_embeddings()
    if head is None or not getattr(text_config, "tie_word_embeddings", False):
        return set()
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p is head.weight}


def _placed_mb(device: torch.device, placed_bytes: int) -> float:
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return round(placed_bytes / 2**20, 1)


def load_layer_by_layer(
    model_dir: Path,
    device: torch.device,
    dtype_name: str = "auto",
    on_layer: Callable[[LayerProgress], None] | None = None,
):
    """Returns the model in eval mode, every weight on ``device``."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype_name, device, config)
    # no_init_weights: from_config would otherwise run the random init (normal_ on
    # every parameter) through torch's slow meta kernels, 80% of a load's time, for
    # weights the checkpoint replaces anyway (measured with py-spy, bench/load.py).
    with BUILDING, init_empty_weights(include_buffers=False), no_init_weights():
        model = model_class(config).from_config(config, dtype=dtype)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = text_config.num_hidden_layers
    layers_prefix = _decoder_layers_prefix(model, num_layers) + "."
    layer_re = re.compile(re.escape(layers_prefix) + r"(\d+)\.")

    files = _weight_files(model_dir)
    param_names = set(dict(model.named_parameters(remove_duplicate=False)))
    model_names = param_names | set(dict(model.named_buffers(remove_duplicate=False)))
    mapping = _map_names(files, model_names, model.base_model_prefix)
    uncovered = param_names - set(mapping.values()) - _tied_output_names(model, config)
    if uncovered:
        # Checkpoints whose weights need converting on load (fused experts, renamed
        # keys): transformers knows how, this loader does not.
        raise NeedsConversion(f"{len(uncovered)} parameters have no weight under their own name, e.g. {sorted(uncovered)[:3]}")

    # Group by layer: -1 before the layers (embeddings), num_layers after (final norm, head).
    groups: dict[int, list[str]] = defaultdict(list)
    for ckpt_name, param_name in mapping.items():
        match = layer_re.match(param_name)
        groups[int(match.group(1)) if match else (-1 if "embed" in param_name or "wte" in param_name or "wpe" in param_name else num_layers)].append(ckpt_name)

    placed_bytes = 0
    with ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(files.values())}
        for group in sorted(groups):
            for ckpt_name in groups[group]:
                tensor = handles[files[ckpt_name]].get_tensor(ckpt_name)
                value_dtype = dtype if tensor.is_floating_point() else None
                set_module_tensor_to_device(model, mapping[ckpt_name], device, value=tensor, dtype=value_dtype)
                placed_bytes += tensor.numel() * (dtype.itemsize if value_dtype else tensor.element_size())
            if 0 <= group < num_layers and on_layer is not None:
                on_layer(LayerProgress(group + 1, num_layers, _placed_mb(device, placed_bytes), str(device)))

    with BUILDING:
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LoadError(f"checkpoint has no weights for {len(missing)} parameters, e.g. {missing[:3]}")
    # Buffers (rotary frequencies, ...) were built on the CPU by from_config.
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            set_module_tensor_to_device(model, name, device, value=buffer)
    model.eval()
    return model


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype_name: str = "auto",
    on_layer: Callable[[LayerProgress], None] | None = None,
    spread: dict[int, int] | None = None,
):
    """Layer by layer when the checkpoint allows; otherwise transformers'
    ``from_pretrained`` onto the device, reported as one step once it is done.

    ``spread`` (CUDA index → bytes): the model is larger than one device; accelerate's
    device map places its layers over those devices (reported as one step too)."""
    if spread is None:
        try:
            return load_layer_by_layer(model_dir, device, dtype_name, on_layer)
        except NeedsConversion as e:
            log.warning("%s: %s; loading with from_pretrained (no per-layer progress)", model_dir.name, e)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype_name, device, config)
    device_map = "auto" if spread else str(device)
    with BUILDING:
        model = model_class(config).from_pretrained(model_dir, dtype=dtype, device_map=device_map, max_memory=spread).eval()
    if on_layer is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        placed = sum(p.numel() * p.element_size() for p in model.parameters())
        total = text_config.num_hidden_layers
        on_layer(LayerProgress(total, total, _placed_mb(device, placed), str(device)))
    return model
