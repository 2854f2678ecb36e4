"""One download per model on a machine: workers sharing a hub cache take a lock per
model revision; the one holding it downloads, the others relay its progress.

The unit tests drive the lock and the progress file with threads and short-lived
processes; the end-to-end ones use real workers (or fetch_model in real processes)
against the throttled hub endpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir

from shared.events import Download
from tests import processes
from tests.sse import events, follow, status, submit
from worker.model.download import DownloadProgress, RemoteFile, _ByteSink
from worker.model.download_lock import (
    ModelDownloadLock,
    ProgressFile,
    lock_dir,
    read_progress,
)

unit = pytest.mark.unit
e2e = pytest.mark.e2e

PROMPT = "The quick brown fox"
HUB_ENV = {"HF_HUB_DISABLE_TELEMETRY": "1"}


class Cancelled(Exception):
    pass


def start_python(code: str, *args: str) -> subprocess.Popen:
    """A short-lived process that prints a line once it is ready, then waits for stdin to close or a kill."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    process.stdin.close()
    process.stdout.close()


# A downloader in another process: holds the model's lock, publishes one event, waits.
HOLDER = """
import sys
from pathlib import Path
from shared.events import Download
from worker.model.download_lock import ModelDownloadLock
with ModelDownloadLock(Path(sys.argv[1]), "models--acme--m@c0ffee", lambda e: None) as lock:
    lock.publish(Download("model.safetensors", 1000, 4000, 1, 2))
    print("holding", flush=True)
    sys.stdin.read()
"""


def relay_in_thread(lock: ModelDownloadLock) -> tuple[threading.Thread, list[BaseException]]:
    """Enters ``lock`` on a thread of its own (a second worker waiting on the first)."""
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            with lock:
                pass
        except BaseException as e:  # handed to the test
            raised.append(e)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, raised


@unit
def test_progress_file_holds_the_latest_event_until_removed(tmp_path):
    writer = ProgressFile(tmp_path / "m.json")
    assert read_progress(writer.path) is None
    writer.write(Download("a", 10, 100, 0, 2))
    writer.write(Download("b", 60, 100, 1, 2))
    assert read_progress(writer.path) == Download("b", 60, 100, 1, 2)
    writer.remove()
    assert read_progress(writer.path) is None and list(tmp_path.iterdir()) == []


@unit
def test_a_dead_downloaders_progress_file_is_not_progress(tmp_path):
    holder = start_python(HOLDER, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "holding"
        path = tmp_path / "models--acme--m@c0ffee.json"
        assert read_progress(path) == Download("model.safetensors", 1000, 4000, 1, 2)
    finally:
        kill(holder)
    assert path.exists()  # the OS released the lock, the file stays behind...
    assert read_progress(path) is None  # ...and is not taken for a live download's progress


@unit
def test_a_waiting_worker_relays_the_holders_progress_then_takes_the_lock(tmp_path):
    relayed: list[Download] = []
    published = [Download("model.safetensors", n * 1000, 4000, 0, 1) for n in range(5)]
    holder = ModelDownloadLock(tmp_path, "models--acme--m@c0ffee", lambda e: None)
    waiter = ModelDownloadLock(tmp_path, "models--acme--m@c0ffee", relayed.append, poll_s=0.02)
    with holder:
        thread, raised = relay_in_thread(waiter)
        for event in published:
            holder.publish(event)
            processes.wait_until(lambda event=event: relayed and relayed[-1] == event, 5, f"relay of {event}")
        assert thread.is_alive()  # still waiting for the lock
    thread.join(5)
    assert not thread.is_alive() and not raised
    assert relayed == published and waiter.followed == published[-1]
    assert not (tmp_path / "models--acme--m@c0ffee.json").exists()


@unit
def test_a_cancel_stops_a_waiting_worker_within_a_poll(tmp_path):
    cancelled = threading.Event()

    def check() -> None:
        if cancelled.is_set():
            raise Cancelled()

    holder = ModelDownloadLock(tmp_path, "models--acme--m@c0ffee", lambda e: None)
    waiter = ModelDownloadLock(tmp_path, "models--acme--m@c0ffee", lambda e: None, check)
    with holder:
        thread, raised = relay_in_thread(waiter)
        holder.publish(Download("model.safetensors", 1, 4000, 0, 1))
        processes.wait_until(lambda: waiter.followed is not None, 5, "the waiter following")
        cancelled.set()
        at = time.monotonic()
        thread.join(5)
        assert time.monotonic() - at < 0.3
        assert len(raised) == 1 and isinstance(raised[0], Cancelled)
        holder.publish(Download("model.safetensors", 2, 4000, 0, 1))  # the holder goes on


@unit
def test_a_new_holder_is_not_confused_with_a_dead_one(tmp_path):
    """The downloader dies; a second worker takes the lock but has written nothing yet:
    a third, waiting, must not relay the dead one's stale numbers as live progress."""
    holder = start_python(HOLDER, str(tmp_path))
    assert holder.stdout.readline().strip() == "holding"
    kill(holder)
    relayed: list[Download] = []
    polls: list[float] = []
    second = ModelDownloadLock(tmp_path, "models--acme--m@c0ffee", lambda e: None)
    third = ModelDownloadLock(tmp_path, "models--acme--m@c0ffee", relayed.append, lambda: polls.append(1), poll_s=0.02)
    with second:  # taken at once: the dead holder's lock went with its process
        assert second.followed is None
        thread, raised = relay_in_thread(third)
        processes.wait_until(lambda: len(polls) >= 5, 5, "the third worker reading the stale file")
        assert relayed == []
        second.publish(Download("model.safetensors", 3000, 4000, 1, 2))
        processes.wait_until(lambda: relayed, 5, "the third worker relaying")
    thread.join(5)
    assert relayed == [Download("model.safetensors", 3000, 4000, 1, 2)] and not raised


@unit
def test_progress_counts_cached_files_and_resumed_bytes_up_front():
    sent: list[Download] = []
    files = [RemoteFile("config.json", 100), RemoteFile("a.safetensors", 1000), RemoteFile("b.safetensors", 1000)]
    progress = DownloadProgress(files, sent.append)
    progress.add_present(files[:2])
    progress.start_file("b.safetensors")
    _ByteSink(progress.add_bytes, initial=400, total=1000).update(600)  # a resumed download
    progress.finish_file()
    assert sent[0] == Download("b.safetensors", 1100, 2100, 2, 3)
    assert sent[-1] == Download("b.safetensors", 2100, 2100, 3, 3)


# --- end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cache_pair(redis_url, hub, log_dir, tmp_path_factory):
    """A hive and two workers on a queue of their own, sharing one HF_HOME."""
    hf_home = tmp_path_factory.mktemp("hf-shared-dl")
    port = processes.free_port()
    queue = "hive:test-shared-dl"
    hive = processes.start(
        "hive-shared-dl",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue),
        log_dir,
    )
    workers = [
        processes.start(
            f"worker-shared-dl-{n}",
            processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--max-batch", "1"),  # one job each: both download
            log_dir,
            env={"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), **HUB_ENV},
        )
        for n in range(2)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_until(
            lambda: processes.health(url).get("workers", 0) >= 2, processes.STARTUP_TIMEOUT_S, "hive and two workers", (hive, *workers)
        )
        yield url, workers, hf_home / "hub"
    finally:
        for proc in (*workers, hive):
            proc.stop()


def safetensors_gets(log: str, repo_id: str) -> int:
    """huggingface_hub's HTTP client logs each request at INFO."""
    return len(re.findall(rf"HTTP Request: GET \S+/{re.escape(repo_id)}/resolve/\S+\.safetensors ", log))


@e2e
def test_two_workers_download_a_cold_model_once(shared_cache_pair, model_root: Path):
    url, workers, hub_cache = shared_cache_pair
    shards = list((model_root / "acme" / "big-shared").glob("*.safetensors"))
    jobs = [submit(url, model="acme/big-shared", prompt=PROMPT, max_tokens=4) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(lambda job: follow(url, job["sse_url"]), jobs))

    progress = []
    for received in streams:
        assert events(received)[-1].event == "end" and received[-1].done
        downloads = [r.json() for r in events(received) if r.event == "download"]
        done = [d["bytes_downloaded"] for d in downloads]
        assert len(downloads) >= 5 and not any(d["cached"] for d in downloads)
        assert done == sorted(done) and done[-1] == downloads[-1]["bytes_total"] > done[0]
        assert downloads[-1]["files_done"] == downloads[-1]["files_total"]
        progress.append({(d["bytes_downloaded"], d["files_done"]) for d in downloads})
    # One stream shows the download, the other relays the same numbers.
    assert progress[0] <= progress[1] or progress[1] <= progress[0]
    finals = [status(url, job["job_id"]) for job in jobs]
    assert all(f["state"] == "completed" for f in finals)
    assert finals[0]["worker"] != finals[1]["worker"]
    logs = [w.log() for w in workers]
    assert sum(safetensors_gets(log, "acme/big-shared") for log in logs) == len(shards)
    assert any("following its progress" in log for log in logs)
    # The lock stays (empty), the progress file is gone, and the hub cache still scans clean.
    assert [p.suffix for p in lock_dir(hub_cache).iterdir()] == [".lock"]
    assert scan_cache_dir(hub_cache).warnings == []


# fetch_model in a process of its own, slowed to ~60 ms a 256 KiB chunk (16 MB: ~4 s),
# printing each event as a JSON line.
FETCH = """
import logging, sys, time
from worker.model.download import fetch_model
logging.basicConfig(level=logging.INFO)
fetch_model(sys.argv[1], None, lambda e: print(e.to_json(), flush=True), lambda: time.sleep(0.06))
"""


def printed_downloads(proc: processes.Proc) -> list[dict]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith('{"event":"download"')]


@e2e
def test_a_waiting_worker_takes_over_from_a_killed_downloader(hub, model_root: Path, log_dir, tmp_path):
    shards = len(list((model_root / "acme" / "big-takeover").glob("*.safetensors")))
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), **HUB_ENV}
    repo_id = "acme/big-takeover"
    first = processes.start("fetch-takeover-1", [sys.executable, "-c", FETCH, repo_id], log_dir, env=env)
    second = None
    try:
        processes.wait_until(
            lambda: any(d["file"].endswith(".safetensors") and d["bytes_downloaded"] for d in printed_downloads(first)),
            30, "the first download under way", (first,),
        )
        second = processes.start("fetch-takeover-2", [sys.executable, "-c", FETCH, repo_id], log_dir, env=env)
        processes.wait_until(lambda: printed_downloads(second), 30, "the second relaying", (first, second))
        first.process.kill()
        first.process.wait()
        assert second.process.wait(30) == 0, second.log()[-4000:]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    downloads = printed_downloads(second)
    total = downloads[-1]["bytes_total"]
    assert "following its progress" in second.log()
    assert downloads[-1]["bytes_downloaded"] == total and downloads[-1]["files_done"] == downloads[-1]["files_total"]
    assert not any(d["cached"] for d in downloads)
    # The first one never finished; the second fetched what it left missing (the
    # first's last printed count may lag a shard it finished).
    last_of_first = printed_downloads(first)[-1]
    assert last_of_first["bytes_downloaded"] < last_of_first["bytes_total"]
    shards_left = shards - (last_of_first["files_done"] - (last_of_first["files_total"] - shards))
    assert 1 <= safetensors_gets(second.log(), repo_id) <= shards_left
