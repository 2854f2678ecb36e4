"""Heartbeat margins under CPU pressure: the gaps between a worker's heartbeats while
its own engine prefills long prompts and loads a deep model, and while other
processes keep every core busy.

    python -m bench.heartbeat                 # writes a section of docs/benchmarks.md
    python -m bench.heartbeat --seconds 20 --no-write

The hive drops a worker whose heartbeat is keys.WORKER_DEAD_AFTER_S old (3 s at a
1 s period): the margin is that minus the longest gap seen. Gaps are read off Redis
itself (the worker's hash's ``last_heartbeat``, Redis's clock), polled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.doc import replace_section
from shared import keys
from tests import processes
from tests.tiny_models import build_model

QUEUE = "hive:bench-heartbeat"
POLL_S = 0.05


def burn(stop) -> None:
    """A busy core, as another tenant of the machine would keep it."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


class HeartbeatGaps:
    """The gaps between the distinct ``last_heartbeat`` values of every worker of QUEUE."""

    def __init__(self, redis_url: str):
        self._redis = redis.Redis.from_url(redis_url)
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        last: dict[str, float] = {}
        while not self._stop.is_set():
            for name in self._redis.zrange(keys.workers(QUEUE), 0, -1):
                beat = self._redis.hget(keys.worker(name.decode()), "last_heartbeat")
                if beat is None:
                    continue
                beat = float(beat)
                if name in last and beat > last[name]:
                    self.gaps.append(beat - last[name])
                last[name] = beat
            time.sleep(POLL_S)


def load(url: str, seconds: float) -> tuple[int, int]:
    """The engine's own long work, with few writes of the worker's hash besides the
    heartbeat's (a job writes it as it starts and ends): one long job at a time on a
    110M-parameter model (a prompt of about 1,500 tokens, prefilled in chunks, then 64 tokens),
    and a 400-layer model loaded beside the first one. Returns the jobs run and their
    prompt's tokens."""
    done = prompt_tokens = 0
    deadline = time.monotonic() + seconds
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 100)
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/v1/inference", json={"model": "bench/deep", "prompt": "Hi", "max_tokens": 1}).raise_for_status()
        while time.monotonic() < deadline:
            job = client.post("/v1/inference", json={"model": "bench/wide", "prompt": prompt, "max_tokens": 64, "temperature": 0}).json()
            while (status := client.get(f"/v1/inference/{job['job_id']}").json())["state"] not in ("completed", "failed", "cancelled"):
                time.sleep(0.2)
            assert status["state"] == "completed", status
            done += 1
            prompt_tokens = status["prompt_tokens"]
    return done, prompt_tokens


def summary(gaps: list[float]) -> dict:
    ordered = sorted(gaps)
    return {
        "heartbeats": len(ordered),
        "gap_median_s": round(statistics.median(ordered), 3),
        "gap_p99_s": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
        "gap_max_s": round(ordered[-1], 3),
        "margin_s": round(keys.WORKER_DEAD_AFTER_S - ordered[-1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="per scenario")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hive-heartbeat-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        build_model(root / "hub" / "bench" / "wide", hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, num_kv_heads=4, tie_word_embeddings=False)
        build_model(root / "hub" / "bench" / "deep", hidden_size=64, intermediate_size=128, num_layers=400, num_heads=2, num_kv_heads=1, shards=4)
        redis_proc, redis_url = processes.start_redis(logs)
        hub_proc, hub_url = processes.start_hub(root / "hub", logs)
        port = processes.free_port()
        url = f"http://127.0.0.1:{port}"
        hive = processes.start("hive", processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", QUEUE), logs)
        worker = processes.start(
            "worker",
            processes.hive_command("worker", "--redis-url", redis_url, "--queue", QUEUE, "--device", "cpu", "--keep-alive", "0"),
            logs,
            env={"HF_ENDPOINT": hub_url, "HF_HOME": str(root / "hf")},
        )
        try:
            processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, 120, "hive and worker", (hive, worker))
            with HeartbeatGaps(redis_url) as idle:
                time.sleep(args.seconds)  # the scenario is the passage of time itself: an idle worker
            results["idle worker"] = summary(idle.gaps)
            with HeartbeatGaps(redis_url) as busy:
                jobs, prompt_tokens = load(url, args.seconds)
            results[f"its own long jobs ({jobs} job{'s' * (jobs != 1)}: a {prompt_tokens:,}-token prefill and 64 tokens on 110M parameters) and a 400-layer load"] = summary(busy.gaps)
            stop = multiprocessing.Event()
            burners = [multiprocessing.Process(target=burn, args=(stop,), daemon=True) for _ in range(multiprocessing.cpu_count())]
            for burner in burners:
                burner.start()
            try:
                with HeartbeatGaps(redis_url) as pressed:
                    jobs, _ = load(url, args.seconds)
            finally:
                stop.set()
                for burner in burners:
                    burner.join()
            results[f"the same ({jobs} job{'s' * (jobs != 1)}) with every core kept busy by {len(burners)} other processes"] = summary(pressed.gaps)
            assert "heartbeat failed" not in worker.log()
        finally:
            for proc in (worker, hive, hub_proc, redis_proc):
                proc.stop()
    print(json.dumps(results, indent=1))
    if not args.no_write:
        replace_section("Heartbeat margins under CPU pressure", render(results, args.seconds))


def render(results: dict, seconds: float) -> str:
    rows = "\n".join(
        f"| {name} | {r['heartbeats']} | {r['gap_median_s']} | {r['gap_p99_s']} | {r['gap_max_s']} | {r['margin_s']} |" for name, r in results.items()
    )
    return f"""## Heartbeat margins under CPU pressure

Command: `python -m bench.heartbeat --seconds {seconds:g}`. One worker (CPU, keep-alive 0, so the
400-layer model loads afresh each round) beside a hive and Redis on this 2-core machine; the gaps
between the writes of its hash are read off Redis (its `last_heartbeat`, Redis's clock): the
heartbeat's, and a job's as it starts and ends, which is what the hive goes by. A heartbeat
is due every {keys.HEARTBEAT_S:g} s and the hive drops a worker after {keys.WORKER_DEAD_AFTER_S:g} s
without one: the margin is that less the longest gap.

| load, {seconds:g} s each | heartbeats | gap median (s) | p99 (s) | max (s) | margin (s) |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


if __name__ == "__main__":
    main()
