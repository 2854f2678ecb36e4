"""The fleet benchmark's cluster: a redis-server, a hub endpoint serving generated
models, `hive serve` and two `hive worker`s sharing one hub cache, all real processes."""

from __future__ import annotations

import json
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared import keys
from tests import processes

PROMPT = "The quick brown fox jumps over the lazy dog."
SHAPES = {
    # Shaped like SmolLM2-135M (as bench.relay's): 0.5 GB of float32 weights in two shards.
    "llama-135m": {"hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "shards": 2},
    "tiny": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
}
COLD_DESCRIPTION = {
    "llama-135m": "Two 135M-shaped Llamas (random weights, 0.5 GB of float32 in two shards).",
    "tiny": "Two tiny Llamas (4 layers, 64 wide, 0.7 MB).",
}
#: Different seeds: the hub endpoint derives the commit from the files' contents.
COLD_MODELS = {"bench/fleet-a": 1, "bench/fleet-b": 2}
STREAM_MODELS = {"bench/stream-a": 3, "bench/stream-b": 4}
WORKERS = ("w1", "w2")
#: A job queued this long or less while a worker was idle counts as not waiting:
#: an idle worker's pickup (BLPOP, RQ's bookkeeping) takes a few milliseconds.
IDLE_WAIT_THRESHOLD_S = 0.05
COLD_DOWNLOADED, COLD_CACHED, WARM = "cold, downloaded", "cold, cached on disk", "warm"



@dataclass
class Cluster:
    url: str
    redis_url: str
    hub_url: str
    hf_home: Path
    queue: str = keys.DEFAULT_QUEUE
    procs: list = field(default_factory=list)

    def cache_folder(self, model: str) -> Path:
        return self.hf_home / "hub" / ("models--" + model.replace("/", "--"))

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/workers", timeout=5).json()["workers"]

    def models_held(self) -> dict[str, list[str]]:
        """Worker name → the models it holds loaded."""
        return {w["id"]: sorted(m["model"] for m in w["models"]) for w in self.workers()}

    def wait_all_idle(self) -> None:
        """A job's stream ends before its worker lists itself as idle again: a job
        submitted in between finds no idle holder of its model (it goes to the
        shared queue, and may start cold on another worker)."""
        processes.wait_until(lambda: all(w["state"] == "idle" for w in self.workers()), 30, "the workers to be idle", tuple(self.procs))


def start_cluster(root: Path, stack: ExitStack, token_delay_ms: float, log_level: str) -> Cluster:
    logs = root / "logs"
    logs.mkdir()
    redis_proc, redis_url = processes.start_redis(logs)
    stack.callback(redis_proc.stop)
    hub_proc, hub_url = processes.start_hub(root / "hub", logs)
    stack.callback(hub_proc.stop)
    port = processes.free_port()
    cluster = Cluster(f"http://127.0.0.1:{port}", redis_url, hub_url, root / "hf")
    # --no-hub: the workers download from the hub endpoint, and the hive fetches nothing.
    hive = processes.start(
        "hive",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--no-hub", "--log-level", log_level),
        logs,
        env={"HF_HOME": str(root / "hive-hf")},
    )
    stack.callback(hive.stop)
    cluster.procs.append(hive)
    for name in WORKERS:
        worker = processes.start(
            name,
            processes.hive_command(
                "worker", "--redis-url", redis_url, "--device", "cpu", "--name", name,
                "--token-delay-ms", str(token_delay_ms), "--keep-alive", "-1", "--log-level", log_level,
            ),
            logs,
            env={"HF_ENDPOINT": hub_url, "HF_HOME": str(cluster.hf_home)},
        )
        stack.callback(worker.stop)
        cluster.procs.append(worker)
    processes.wait_until(lambda: len(cluster.models_held()) == len(WORKERS), processes.STARTUP_TIMEOUT_S, "hive and workers", tuple(cluster.procs))
    # The hub endpoint hashes a model's files on its first request: not part of any download timed here.
    for model in (*COLD_MODELS, *STREAM_MODELS):
        httpx.get(f"{hub_url}/api/models/{model}", timeout=120).raise_for_status()
    return cluster


def log_findings(cluster: Cluster) -> dict[str, list[str]]:
    """Warnings, errors and tracebacks in each process's log, each job named in
    them followed by how that job ended."""
    found = {}
    for proc in cluster.procs:
        lines = [line for line in proc.log().splitlines() if any(w in line for w in (" WARNING ", " ERROR ", "Traceback"))]
        for n, line in enumerate(lines):
            for job_id in set(re.findall(r"\b[0-9a-f]{32}\b", line)):
                status = httpx.get(f"{cluster.url}/v1/inference/{job_id}", timeout=5).json()
                outcome = {k: status.get(k) for k in ("state", "attempt", "worker", "stop_reason", "error")}
                lines[n] += f"\n    → job {job_id[:8]}: {json.dumps(outcome)}, total {status.get('timings', {}).get('total_ms')} ms"
        if lines:
            found[proc.name] = lines
    return found


def print_findings(findings: dict[str, list[str]]) -> None:
    for name, lines in findings.items():
        print(f"\n{name} log: {len(lines)} warnings or errors, first ones:\n  " + "\n  ".join(lines[:10]), file=sys.stderr)


