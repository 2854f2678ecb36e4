"""Session fixtures: one redis-server, a hub endpoint serving generated tiny models,
and two real clusters (hive serve + hive worker processes) on their own queues:
``cluster`` generates at full speed, ``slow_cluster`` pauses after each token so
that streaming can be observed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests import processes
from tests.tiny_models import TOOL_CHAT_TEMPLATE, build_model

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "hive" / "demo_models" / "hive-demo" / "tiny-llama"

#: The hub endpoint's speed: slow enough that a multi-MB shard yields several
#: progress events, fast enough that the tiny models arrive in a blink.
HUB_BYTES_PER_S = 8_000_000


@dataclass
class Hub:
    url: str
    root: Path


@dataclass
class Cluster:
    url: str
    redis_url: str
    queue: str
    hub: Hub
    hive: processes.Proc
    worker: processes.Proc

    def sse_url(self, path: str) -> str:
        return f"{self.url}{path}"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """acme/tiny (and copies under other names, so tests can own a cold model),
    acme/big, whose shards are several MB, and acme/deep, small but with 200
    decoder layers, so that loading it takes a while."""
    root = tmp_path_factory.mktemp("hub")
    tiny = build_model(root / "acme" / "tiny")
    for name in ("tiny-warm", "tiny-slow", "tiny-cli", "tiny-order", "fleet-a", "fleet-b", "budget-a", "budget-b", "pulled"):
        shutil.copytree(tiny, root / "acme" / name)
    big = build_model(root / "acme" / "big", hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=4, shards=2)
    for name in ("big-cancel", "big-retry", "big-shared", "big-takeover"):
        shutil.copytree(big, root / "acme" / name)
    # Random weights with Qwen 2.5's tool template: what the answer's calls and JSON
    # look like comes from the grammar alone.
    build_model(root / "acme" / "tiny-tools", chat_template=TOOL_CHAT_TEMPLATE, seed=1)
    build_model(root / "acme" / "deep", hidden_size=32, intermediate_size=64, num_layers=200, num_heads=2, num_kv_heads=1, shards=1)
    # The built-in demo model: trained, so greedy argmax margins are clear (batching tests).
    shutil.copytree(DEMO_MODEL_DIR, root / "hive-demo" / "tiny-llama")
    return root


@pytest.fixture(scope="session")
def redis_url(log_dir):
    proc, url = processes.start_redis(log_dir)
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def hub(model_root, log_dir):
    proc, url = processes.start_hub(model_root, log_dir, HUB_BYTES_PER_S)
    yield Hub(url, model_root)
    proc.stop()


def _start_cluster(name: str, redis_url: str, hub: Hub, log_dir: Path, hf_home: Path, *worker_args: str) -> Cluster:
    url, queue, hive, worker = processes.start_hive_and_worker(name, redis_url, hub.url, log_dir, hf_home, *worker_args, hive_args=("--sse-ping-s", "1"))
    return Cluster(url, redis_url, queue, hub, hive, worker)


@pytest.fixture(scope="session")
def clusters(redis_url, hub, log_dir, tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf-home")
    fast = _start_cluster("fast", redis_url, hub, log_dir, hf_home)
    slow = _start_cluster("slow", redis_url, hub, log_dir, hf_home, "--token-delay-ms", "100")
    try:
        for c in (fast, slow):
            processes.wait_until(
                lambda c=c: processes.health(c.url).get("workers", 0) >= 1,
                processes.STARTUP_TIMEOUT_S,
                f"{c.queue} hive and worker",
                (c.hive, c.worker),
            )
        yield fast, slow
    finally:
        for c in (fast, slow):
            c.worker.stop()
            c.hive.stop()


@pytest.fixture(scope="session")
def cluster(clusters) -> Cluster:
    return clusters[0]


@pytest.fixture(scope="session")
def slow_cluster(clusters) -> Cluster:
    return clusters[1]


@pytest.fixture(scope="session")
def idle_hive(redis_url, log_dir):
    """A real `hive serve` on a queue no worker serves: its jobs stay queued."""
    port = processes.free_port()
    queue = "hive:test-idle"
    proc = processes.start(
        "hive-idle",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue, "--sse-ping-s", "0.3"),
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "idle hive", (proc,))
    yield url, queue
    proc.stop()


@pytest.fixture()
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()
