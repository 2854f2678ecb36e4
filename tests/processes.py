"""Starting and stopping the real processes tests talk to: redis-server, the hub
endpoint, ``hive serve`` and ``hive worker``. Readiness is awaited on a health
check or a PING, never on a fixed sleep."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(name: str, command: list[str], log_dir: Path, env: dict | None = None) -> Proc:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    log_file.close()
    return Proc(name, process, log_path)


def wait_until(condition, timeout_s: float, what: str, procs: tuple[Proc, ...] = ()) -> None:
    """Polls ``condition`` (a health check) until it is true; fails early if a process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        try:
            if condition():
                return
        except (httpx.TransportError, redis.ConnectionError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout_s} s")


def start_redis(log_dir: Path) -> tuple[Proc, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_until(client.ping, 10, "redis-server", (proc,))
    client.close()
    return proc, url


def start_redis_on(port: int, log_dir: Path, data_dir: Path | None = None) -> Proc:
    """A redis-server on ``port`` (to stop and start again on the same address);
    ``data_dir``: keep an append-only file there, so a restart keeps the data."""
    exe = shutil.which("redis-server")
    persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)] if data_dir else ["--appendonly", "no"]
    name = f"redis-{port}-{time.monotonic_ns()}"
    proc = start(name, [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence], log_dir)
    client = redis.Redis(port=port)
    wait_until(client.ping, 10, "redis-server", (proc,))
    client.close()
    return proc


def start_hive_and_worker(
    name: str, redis_url: str, hub_url: str, log_dir: Path, hf_home: Path, *worker_args: str, hive_args: tuple[str, ...] = ()
) -> tuple[str, str, Proc, Proc]:
    """`hive serve` and one CPU `hive worker` on the queue ``hive:test-<name>``, the
    worker downloading from ``hub_url``: (the hive's URL, the queue, hive, worker). The
    caller waits for them on /health."""
    port = free_port()
    queue = f"hive:test-{name}"
    hive = start(f"hive-{name}", hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue, *hive_args), log_dir)
    worker = start(
        f"worker-{name}",
        hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", *worker_args),
        log_dir,
        env={"HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    return f"http://127.0.0.1:{port}", queue, hive, worker


def start_hub(root: Path, log_dir: Path, bytes_per_s: int = 0, access_log: bool = False, name: str = "hub") -> tuple[Proc, str]:
    """``access_log``: the log names every request, so a test can count what was served."""
    port = free_port()
    command = [sys.executable, "-m", "hive.hub.folders", str(root), "--port", str(port), "--bytes-per-s", str(bytes_per_s)]
    proc = start(name, [*command, "--access-log"] if access_log else command, log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/api/models/none/none").status_code == 404, 20, "hub endpoint", (proc,))
    return proc, url


def hive_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hive", *args]


def run_hive(*args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """Runs a `hive` command to its end."""
    return subprocess.run(
        hive_command(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()
