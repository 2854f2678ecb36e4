"""One download per model on a machine: a lock in the hub cache, and the progress
file that the workers waiting on it follow.

The worker that holds ``<HF_HUB_CACHE>/.locks/hive/models--<org>--<name>@<commit>.lock``
downloads, and writes each progress event it emits to ``<...>.json`` next to it.
A worker that finds the lock taken downloads nothing: it relays the numbers in that
file to its own job (about 10 a second), checks for a cancel between two reads, and
takes the lock once it is free; by then the files are in the cache, or, if the
downloader died or was cancelled, it fetches what is still missing itself.

A dead downloader's progress file stays behind (the OS releases the lock, not the
file). So that it is never taken for a live download, each version of the file is
locked by its writer (``filelock.lock_descriptor`` on the new file, before it is
moved into place) for as long as it is current; a reader that can take that lock
on the file it opened knows the writer is gone, and ignores it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout, lock_descriptor

from shared.events import Download

log = logging.getLogger("worker.download_lock")

#: A waiting worker reads the progress file and tries the lock this often.
POLL_S = 0.1


def lock_dir(hub_cache: str | Path) -> Path:
    """Inside the hub cache's own ``.locks`` folder, which ``hf cache scan`` skips (it
    reports any other unknown folder in the cache as a corrupted repo)."""
    return Path(hub_cache) / ".locks" / "hive"


def lock_name(repo_id: str, commit: str) -> str:
    """``models--org--name@<commit>``: the hub cache's folder name plus the revision."""
    return f"models--{repo_id.replace('/', '--')}@{commit}"


class ProgressFile:
    """The downloader's side: each event replaces the file atomically (a temp file,
    locked, then ``os.replace``); the lock on the current version is held until the
    next one replaces it, or the file is removed, or the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._temp = path.with_name(path.name + ".tmp")
        self._fd: int | None = None

    def write(self, event: Download) -> None:
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # Only the holder of the download lock writes here and no reader opens the
            # temp file, so this lock is never contended.
            lock_descriptor(fd, blocking=False)
            os.write(fd, event.to_json().encode())
            os.replace(self._temp, self.path)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)  # unlocks the version just replaced
        self._fd = fd

    def remove(self) -> None:
        """Removes the file, or a dead downloader's stale one, before the lock goes."""
        self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_progress(path: Path) -> Download | None:
    """The live downloader's latest event; None when there is no file, or when its
    writer is gone (its lock on the file could be taken)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if lock_descriptor(fd, blocking=False):
            return None  # a dead downloader's last word, not progress
        data = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)  # releases the lock the probe may have taken
    try:
        fields = json.loads(data)
        fields.pop("event", None)
        return Download(**fields)
    except (ValueError, TypeError) as e:
        log.warning("unreadable download progress in %s: %s", path, e)
        return None


class ModelDownloadLock:
    """``with ModelDownloadLock(...) as lock:`` returns once this worker holds the
    model's download lock, having relayed any other worker's download in between
    with ``emit``. Inside, ``lock.publish`` emits an event and shares it with the
    workers waiting; ``lock.followed`` is the last event relayed (None if none)."""

    def __init__(
        self,
        lock_dir: Path,
        name: str,
        emit: Callable[[Download], None],
        check: Callable[[], None] = lambda: None,
        poll_s: float = POLL_S,
    ):
        lock_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(lock_dir / f"{name}.lock")
        self._progress = ProgressFile(lock_dir / f"{name}.json")
        self._emit = emit
        self._check = check
        self._poll_s = poll_s
        self.followed: Download | None = None

    def __enter__(self) -> ModelDownloadLock:
        waiting = False
        while not self._try_lock():
            if not waiting:
                log.info("%s is being downloaded by another worker; following its progress", self._progress.path.stem)
                waiting = True
            self._check()
            progress = read_progress(self._progress.path)
            if progress is not None and progress != self.followed:
                self._emit(progress)
                self.followed = progress
            time.sleep(self._poll_s)
        return self

    def _try_lock(self) -> bool:
        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            return False
        return True

    def publish(self, event: Download) -> None:
        self._emit(event)
        self._progress.write(event)

    def __exit__(self, *exc) -> None:
        try:
            self._progress.remove()
        finally:
            self._lock.release()
