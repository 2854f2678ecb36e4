"""The models a worker holds in memory between jobs, keyed by (repo id, revision)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .loader import LayerProgress, load_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {name} asked for, but CUDA is not available here")
    return device


@dataclass
class LoadedModel:
    repo_id: str
    revision: str | None
    model: object
    tokenizer: object
    load_ms: float
    last_used: float = field(default_factory=time.monotonic)


class ModelCache:
    """Loaded models stay until the worker exits (eviction comes with memory budgets)."""

    def __init__(self, device: torch.device, dtype_name: str = "auto"):
        self.device = device
        self.dtype_name = dtype_name
        self._models: dict[tuple[str, str | None], LoadedModel] = {}

    def get(self, repo_id: str, revision: str | None) -> LoadedModel | None:
        loaded = self._models.get((repo_id, revision))
        if loaded is not None:
            loaded.last_used = time.monotonic()
        return loaded

    def load(
        self, repo_id: str, revision: str | None, folder: Path, on_layer: Callable[[LayerProgress], None]
    ) -> LoadedModel:
        from transformers import AutoTokenizer

        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_model(folder, self.device, self.dtype_name, on_layer)
        load_ms = round((time.perf_counter() - start) * 1000, 1)
        loaded = LoadedModel(repo_id, revision, model, tokenizer, load_ms)
        self._models[(repo_id, revision)] = loaded
        log.info("loaded %s@%s on %s in %.0f ms", repo_id, revision or "main", self.device, load_ms)
        return loaded
