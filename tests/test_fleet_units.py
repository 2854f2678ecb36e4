"""The fleet's pieces that need no server: memory accounting, eviction order,
keep-alive, durations and sizes, device assignment."""

from __future__ import annotations

import math

import pytest
import torch

from hive.cli import _memory_size
from hive.embedded import worker_devices
from shared.spec import InferenceRequest, parse_duration
from tests.tiny_models import build_model
from worker.model.loaded_models import LoadedModel, LoadedModels, ModelTooLarge, resolve_devices, weights_bytes
from worker.model.loader import load_model

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def held(cache: LoadedModels, name: str, size: int, last_used: float) -> LoadedModel:
    loaded = LoadedModel(name, None, object(), object(), 1.0, size, last_used=last_used)
    cache._models[loaded.key] = loaded
    return loaded


def test_make_room_unloads_least_recently_used_idle_models_first():
    cache = LoadedModels([CPU], budget_bytes=100)
    unloaded = []
    cache.on_unload = lambda repo_id, revision: unloaded.append(repo_id)
    held(cache, "a/old", 40, last_used=1.0)
    held(cache, "a/busy", 40, last_used=0.5).users = 1
    held(cache, "a/new", 10, last_used=3.0)
    cache.make_room("a/next", 45)
    assert unloaded == ["a/old"]  # enough: 40 + 10 + 45 fits; the busy one is never touched
    with pytest.raises(ModelTooLarge):
        cache.make_room("a/huge", 101)
    with pytest.raises(ModelTooLarge):
        cache.make_room("a/beside-busy", 70)  # only the busy model would be left, and 40 + 70 > 100


def test_keep_alive_zero_unloads_at_once_and_a_negative_one_never():
    cache = LoadedModels([CPU], budget_bytes=100, keep_alive_s=300)
    a = held(cache, "a/a", 10, 1.0)
    cache.release(a, 0)
    assert cache.kept() == []  # no longer offered to new jobs; unloaded once the job's end is out
    cache.unload_expired()
    assert cache.held() == []
    b = held(cache, "a/b", 10, 1.0)
    cache.release(b, -1)
    assert b.expires_at == math.inf
    c = held(cache, "a/c", 10, 1.0)
    cache.release(c, None)
    assert c.expires_at > 0 and c.expires_at != math.inf  # the worker's default
    c.expires_at = 0
    cache.unload_expired()
    assert [m.repo_id for m in cache.held()] == ["a/b"]


def test_weights_bytes_matches_the_loaded_model(tmp_path):
    folder = build_model(tmp_path / "m")
    model = load_model(folder, CPU)
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights_bytes(folder, CPU, "auto") == actual
    assert weights_bytes(folder, CPU, "bfloat16") == actual // 2


@pytest.mark.parametrize("text,seconds", [("300", 300), ("5m", 300), ("1h", 3600), ("30s", 30), ("0", 0), ("-1", -1), ("250ms", 0.25)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert InferenceRequest(model="a/b", prompt="x", keep_alive=text).keep_alive == seconds


@pytest.mark.parametrize("text,size", [("auto", 0), ("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1000", 1000), ("1.5g", 1_500_000_000)])
def test_memory_sizes(text, size):
    assert _memory_size(text) == size


def test_one_device_per_worker():
    assert worker_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices("cpu", 2) == ["cpu", "cpu"]
    assert worker_devices("cuda:1", 1) == ["cuda:1"]


def test_only_cuda_devices_can_be_spanned():
    assert resolve_devices("cpu") == [CPU]
    with pytest.raises(SystemExit):
        resolve_devices("cpu,cpu")
