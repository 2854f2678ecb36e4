"""``hive up``: Redis, the hive and one worker on one machine, in the foreground.

Works on a fresh machine: a ``redis-server`` on PATH when there is one, otherwise
fakeredis' in-memory TCP server; the built-in demo model served by the hive's own
hub endpoint (``/hub``), so the worker downloads it with the real hub client and
no network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis
from rich.console import Console

from shared.settings import Settings

log = logging.getLogger("hive.up")

DEMO_MODELS = Path(__file__).parent / "demo_models"
START_TIMEOUT_S = 120.0


class StartupError(Exception):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wait_for_redis(url: str, process: subprocess.Popen | None) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if process is not None and process.poll() is not None:
                raise StartupError(f"redis-server exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise StartupError(f"redis at {url} did not answer within 10 s") from None
            time.sleep(0.05)
        finally:
            client.close()


def _fake_redis_server(port: int):
    """fakeredis' TCP server, with three fixes for serving Hive's traffic."""
    from fakeredis import TcpFakeServer
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler

    class KeepOpenHandler(TCPFakeRequestHandler):
        # fakeredis hangs up after a command it does not implement (RQ asks for
        # INFO once, and copes with the error): serve on until the client leaves.
        def handle(self) -> None:
            while not self.server._shutdown_event.is_set():
                super().handle()
                try:
                    if self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        return  # the client closed the connection
                except BlockingIOError:
                    continue  # still open, nothing to read yet
                except OSError:
                    return

    class NoDelayFakeServer(TcpFakeServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.RequestHandlerClass = KeepOpenHandler
            # TcpFakeServer sets daemon_threads = False in __init__: a connection left
            # blocked in BLPOP (a stopped worker's) would then hold up our exit.
            self.daemon_threads = True
            self.block_on_close = False

        def get_request(self):
            # Without TCP_NODELAY a pipelined reply waits out a 40 ms delayed ACK:
            # 20 tokens/s instead of thousands.
            conn, address = super().get_request()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn, address

    return NoDelayFakeServer(("127.0.0.1", port), server_type="redis")


@contextlib.contextmanager
def embedded_redis(console: Console) -> Iterator[str]:
    """A private Redis for this run: redis-server when installed, else fakeredis."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    exe = shutil.which("redis-server")
    with contextlib.ExitStack() as stack:
        process = None
        if exe:
            process = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
            stack.callback(stop_process, process)
            what = exe
        else:
            server = _fake_redis_server(port)
            threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            what = "no redis-server on PATH; embedded in-memory Redis (fakeredis)"
        _wait_for_redis(url, process)
        console.print(f"[dim]redis: {what} on port {port}[/]")
        yield url


def worker_devices(device: str, count: int) -> list[str]:
    """One device per worker: ``cuda`` with N workers means cuda:0 … cuda:N-1 (the
    hive does not import torch to count GPUs; the workers check the devices exist).
    Any other device is shared by all of them (several CPU workers, say)."""
    if device == "cuda" and count > 1:
        return [f"cuda:{i}" for i in range(count)]
    return [device] * count


def start_worker(settings: Settings, device: str, hf_endpoint: str, verbose: bool) -> subprocess.Popen:
    # No metrics port: several workers inheriting one would collide.
    env = {**os.environ, "HF_ENDPOINT": hf_endpoint, "HIVE_REDIS_URL": settings.redis_url, "HIVE_METRICS_PORT": "0"}
    command = [sys.executable, "-m", "hive", "worker", "--device", device, "--queue", settings.queue]
    if settings.token_delay_ms:
        command += ["--token-delay-ms", str(settings.token_delay_ms)]
    if not verbose:
        command += ["--log-level", "warning"]
    return subprocess.Popen(command, env=env)


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(url: str, workers: list[subprocess.Popen], console: Console) -> None:
    """Until /health reports every worker (a worker imports torch first: seconds)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with console.status("starting the workers…"), httpx.Client(base_url=url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            for worker in workers:
                if worker.poll() is not None:
                    raise StartupError(f"a worker exited with code {worker.returncode} while starting")
            with contextlib.suppress(httpx.TransportError):
                health = client.get("/health").json()
                if health.get("workers", 0) >= len(workers):
                    return
            time.sleep(0.1)
    raise StartupError(f"no worker registered within {START_TIMEOUT_S:.0f} s")


def run_up(
    settings: Settings, hf_endpoint: str | None, prompt_body: dict | None, verbose: bool, workers: int = 1, redis_url: str | None = None
) -> int:
    """Runs until Ctrl-C, or, with ``prompt_body``, until that prompt is answered.
    ``redis_url``: a Redis (or Sentinel) to use instead of a private one."""
    import uvicorn

    from hive.app import create_app
    from hive.client.run import run_prompt
    from hive.server import SERVER_OPTIONS

    console = Console(stderr=True)
    if port_in_use(settings.host, settings.port):
        console.print(f"[red]port {settings.port} on {settings.host} is in use: pass --port[/]")
        return 2
    url = f"http://{settings.host}:{settings.port}"
    outcome = {"code": 0}
    with contextlib.ExitStack() as stack:
        try:
            settings = settings.replace(redis_url=redis_url or stack.enter_context(embedded_redis(console)))
        except StartupError as e:
            console.print(f"[red]{e}[/]")
            return 1
        procs = [start_worker(settings, device, hf_endpoint or f"{url}/hub", verbose) for device in worker_devices(settings.device, workers)]
        for proc in procs:
            stack.callback(stop_process, proc)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, hub_root=DEMO_MODELS),
                host=settings.host,
                port=settings.port,
                log_level="info" if verbose else "warning",
                **SERVER_OPTIONS,
            )
        )

        def drive() -> None:
            try:
                wait_until_ready(url, procs, console)
                if prompt_body is None:
                    console.print(f"[green]hive up[/] on {url} · {workers} worker{'s' * (workers > 1)} · Ctrl-C stops")
                    console.print(f'[dim]try: hive run --url {url} "Hello"[/]')
                    return
                outcome["code"] = run_prompt(url, prompt_body, console)
            except StartupError as e:
                console.print(f"[red]{e}[/]")
                outcome["code"] = 1
            if prompt_body is not None or outcome["code"]:
                server.should_exit = True

        threading.Thread(target=drive, name="hive-up", daemon=True).start()
        server.run()
    return outcome["code"]
