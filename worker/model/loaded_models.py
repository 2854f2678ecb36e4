"""The models a worker holds in memory between jobs, keyed by (repo id, revision),
within a memory budget: the least recently used idle model makes room for a new
one, and an idle model unloads when its keep-alive runs out."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.model.loader import LayerProgress, load_model, resolve_dtype

log = logging.getLogger("worker.models")

#: Left free when the budget is the device's free memory: activations, the KV
#: cache, CUDA's own context, the Python process.
MEMORY_HEADROOM = 1 << 30

_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class ModelTooLarge(Exception):
    code = "MODEL_TOO_LARGE"


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {name} asked for, but CUDA is not available here")
    return device


def resolve_devices(spec: str) -> list[torch.device]:
    """``cuda:0,cuda:1``: one worker spanning several GPUs (see LoadedModels)."""
    devices = [resolve_device(name.strip()) for name in spec.split(",") if name.strip()]
    if len(devices) > 1 and any(d.type != "cuda" for d in devices):
        raise SystemExit(f"only CUDA devices can be spanned, not {spec}")
    return devices


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device: CUDA's own figures, or the machine's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def default_budget(device: torch.device) -> int:
    free, _ = device_memory(device)
    return max(free - MEMORY_HEADROOM, 0)


def weights_bytes(model_dir: Path, device: torch.device, dtype_name: str) -> int:
    """What the model's weights will take on ``device``, from the safetensors
    headers alone (8-byte length, then JSON: no tensor is read): floating-point
    tensors at the dtype the loader will use, the others as stored."""
    from transformers import AutoConfig

    itemsize = resolve_dtype(dtype_name, device, AutoConfig.from_pretrained(model_dir)).itemsize
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(entry["shape"])
            stored = entry["dtype"]
            total += numel * (itemsize if stored in _FLOAT_DTYPES else _SAFETENSORS_ITEMSIZE.get(stored, 1))
    return total


@dataclass
class LoadedModel:
    repo_id: str
    revision: str | None
    model: object
    tokenizer: object
    load_ms: float
    size_bytes: int
    last_used: float = field(default_factory=time.time)
    #: Jobs using it (its batch): never evicted or expired meanwhile.
    users: int = 0
    #: Unload after this time (time.monotonic()); inf: until evicted.
    expires_at: float = math.inf
    #: The snapshot it was loaded from (an embedding job reads its pooling there).
    folder: Path | None = None

    @property
    def in_use(self) -> bool:
        return self.users > 0

    @property
    def key(self) -> tuple[str, str | None]:
        return self.repo_id, self.revision


class LoadedModels:
    """Thread-safe: jobs run on the worker's main thread, expiry on its heartbeat thread.

    One device (the usual set-up: one worker per GPU): models load layer by layer
    onto it. Several devices (``--device cuda:0,cuda:1``, chosen by the operator for
    models larger than one GPU): every model is spread over them by accelerate's
    device map (``from_pretrained(device_map="auto", max_memory=...)``), within each
    device's budget; the budget is their sum.
    """

    def __init__(self, devices: list[torch.device], dtype_name: str = "auto", budget_bytes: int = 0, keep_alive_s: float = 300.0):
        """``budget_bytes``: per device; 0: each device's free memory minus headroom."""
        self.devices = devices
        self.device = devices[0]  # where inputs go; a spread model's embeddings land here
        self.dtype_name = dtype_name
        self.device_budgets = {d: budget_bytes or default_budget(d) for d in devices}
        self.budget_bytes = sum(self.device_budgets.values())
        self.keep_alive_s = keep_alive_s
        self._models: dict[tuple[str, str | None], LoadedModel] = {}
        self._lock = threading.RLock()
        self._loading: dict[tuple[str, str | None], threading.Lock] = {}
        #: The KV-cache bytes the batches of the loaded models may take (the runtime
        #: sets it): a new model makes room beside them too.
        self.kv_reserved: Callable[[], int] = lambda: 0
        #: Frees cached prefix blocks (the batches' prefix caches): bytes wanted → freed.
        self.reclaim_kv: Callable[[int], int] = lambda nbytes: 0
        #: Called with (repo id, revision) after a model is unloaded.
        self.on_unload: Callable[[str, str | None], None] = lambda repo_id, revision: None

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.size_bytes for m in self._models.values())

    def loading(self, repo_id: str, revision: str | None) -> threading.Lock:
        """Held while a job takes or loads the model: a second job for the same model
        waits for the first one's load instead of loading it twice."""
        with self._lock:
            return self._loading.setdefault((repo_id, revision), threading.Lock())

    def held(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def take(self, repo_id: str, revision: str | None) -> LoadedModel | None:
        """The loaded model, marked in use by one more job (until ``release``), or None."""
        with self._lock:
            loaded = self._models.get((repo_id, revision))
            if loaded is not None:
                loaded.users += 1
                loaded.last_used = time.time()
            return loaded

    def release(self, loaded: LoadedModel, keep_alive_s: float | None) -> None:
        """A job is done with it; once no job uses it, it stays for ``keep_alive_s``
        (None: the worker's default) after the last job's release."""
        keep = self.keep_alive_s if keep_alive_s is None else keep_alive_s
        with self._lock:
            loaded.users = max(loaded.users - 1, 0)
            loaded.last_used = time.time()
            # keep_alive 0 expires it now; unload_expired() unloads it once the job's
            # end is out (the client does not wait for the unload).
            loaded.expires_at = math.inf if keep < 0 else time.monotonic() + keep

    def kept(self) -> list[LoadedModel]:
        """The models held that are not about to be unloaded (keep-alive left)."""
        now = time.monotonic()
        with self._lock:
            return [m for m in self._models.values() if m.in_use or m.expires_at > now]

    def check_fits(self, repo_id: str, needed_bytes: int) -> None:
        if needed_bytes > self.budget_bytes:
            raise ModelTooLarge(
                f"{repo_id} needs {needed_bytes / 2**20:.0f} MiB on {self.device}; "
                f"this worker's budget is {self.budget_bytes / 2**20:.0f} MiB (--max-memory)"
            )

    def make_room(self, repo_id: str, needed_bytes: int) -> None:
        """Unloads least recently used idle models until ``needed_bytes`` fit."""
        self.check_fits(repo_id, needed_bytes)
        # Cached prefix blocks go before any model does.
        if (over := self.used_bytes + self.kv_reserved() + needed_bytes - self.budget_bytes) > 0:
            self.reclaim_kv(over)
        with self._lock:
            for victim in sorted((m for m in self._models.values() if not m.in_use), key=lambda m: m.last_used):
                if self.used_bytes + self.kv_reserved() + needed_bytes <= self.budget_bytes:
                    break
                self._unload(victim, f"making room for {repo_id}")
            if self.used_bytes + self.kv_reserved() + needed_bytes > self.budget_bytes:
                raise ModelTooLarge(f"{repo_id} does not fit next to the models in use on {self.device}")

    def unload_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            for loaded in [m for m in self._models.values() if not m.in_use and m.expires_at <= now]:
                self._unload(loaded, "keep-alive expired")

    def _unload(self, loaded: LoadedModel, why: str) -> None:
        del self._models[loaded.key]
        loaded.model = loaded.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded %s@%s (%s)", loaded.repo_id, loaded.revision or "main", why)
        self.on_unload(loaded.repo_id, loaded.revision)

    def load(
        self, repo_id: str, revision: str | None, folder: Path, on_layer: Callable[[LayerProgress], None]
    ) -> LoadedModel:
        """Loads the model (in use, as ``take`` returns it) after making room for it."""
        from transformers import AutoTokenizer

        self.make_room(repo_id, weights_bytes(folder, self.device, self.dtype_name))
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        spread = {d.index: b for d, b in self.device_budgets.items()} if len(self.devices) > 1 else None
        model = load_model(folder, self.device, self.dtype_name, on_layer, spread)
        load_ms = round((time.perf_counter() - start) * 1000, 1)
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        loaded = LoadedModel(repo_id, revision, model, tokenizer, load_ms, size, users=1, folder=folder)
        with self._lock:
            self._models[loaded.key] = loaded
        log.info("loaded %s@%s on %s in %.0f ms (%.1f MiB)", repo_id, revision or "main", self.device, load_ms, size / 2**20)
        return loaded
