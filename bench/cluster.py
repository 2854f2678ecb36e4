"""The cluster most benchmarks measure: a redis-server, a hub endpoint serving the
models under a folder, one `hive serve` and one CPU `hive worker`, all real processes,
started and awaited healthy, stopped on leaving."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests import processes


@dataclass
class OneWorkerCluster:
    url: str
    redis_url: str
    redis: processes.Proc
    hive: processes.Proc
    worker: processes.Proc


@contextlib.contextmanager
def one_worker_cluster(root: Path, *worker_args: str) -> Iterator[OneWorkerCluster]:
    """Serves the models under ``root / "hub"``; logs and the worker's HF_HOME go under ``root``."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    redis_proc, redis_url = processes.start_redis(logs)
    hub_proc, hub_url = processes.start_hub(root / "hub", logs)
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    hive = processes.start("hive", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--log-level", "warning"), logs)
    worker = processes.start(
        "worker",
        processes.hive_command("worker", "--redis-url", redis_url, "--device", "cpu", "--log-level", "warning", *worker_args),
        logs,
        env={"HF_ENDPOINT": hub_url, "HF_HOME": str(root / "hf")},
    )
    try:
        processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, 120, "hive and worker", (hive, worker))
        yield OneWorkerCluster(url, redis_url, redis_proc, hive, worker)
    finally:
        for proc in (worker, hive, hub_proc, redis_proc):
            proc.stop()
