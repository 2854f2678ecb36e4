"""Fetching a model from the Hugging Face hub with real byte progress.

Uses huggingface_hub itself (so HF_ENDPOINT, HF_HOME, HF_TOKEN and the shared hub
cache behave as everywhere else) and hooks its ``tqdm_class`` to see every chunk.
Workers sharing a hub cache download a model once: see ``download_lock``.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared.events import Download
from worker.model.download_lock import ModelDownloadLock, lock_dir, lock_name

log = logging.getLogger("worker.download")

#: What a model needs: config, tokenizer files and safetensors weights.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
    # What sentence-transformers declares of an embedding model (worker/model/embedder.py):
    # its modules, its pooling (in a folder of its own), its sequence length and prompts.
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "*_Pooling/config.json",
)
#: The one kind of file fetched from a subfolder.
POOLING_CONFIG = "*_Pooling/config.json"

#: At most this many progress events a second for one job.
PROGRESS_PER_S = 10
#: huggingface_hub reads the body in 10 MiB chunks and reports progress once per
#: chunk: one update per 10 MiB is too coarse for a progress bar on a slow link.
#: Chunks this size cost nothing measurable and give a byte count at any speed.
HUB_CHUNK_BYTES = 256 * 1024


class ModelNotFound(Exception):
    code = "MODEL_NOT_FOUND"


class ModelNotSupported(Exception):
    code = "MODEL_NOT_SUPPORTED"


class DownloadFailed(Exception):
    code = "DOWNLOAD_FAILED"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int


class _ByteSink:
    """Stands in for tqdm inside ``hf_hub_download``: huggingface_hub calls
    ``update(n)`` with each chunk it writes, which is exactly the progress we report;
    ``initial`` is what a resumed download already had on disk."""

    def __init__(self, on_bytes: Callable[[int], None], initial: int = 0, **_tqdm_kwargs):
        self._on_bytes = on_bytes
        if initial:
            on_bytes(initial)

    def update(self, n: int = 1) -> None:
        if n:
            self._on_bytes(n)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class DownloadProgress:
    """Whole-model byte counts, throttled to PROGRESS_PER_S events; the last event
    always shows the full size."""

    def __init__(
        self,
        files: list[RemoteFile],
        emit: Callable[[Download], None],
        clock=time.monotonic,
        check: Callable[[], None] = lambda: None,
    ):
        self.files_total = len(files)
        self.bytes_total = sum(f.size for f in files)
        self.bytes_downloaded = 0
        self.files_done = 0
        self.file: str | None = None
        self._emit = emit
        self._clock = clock
        self._check = check
        self._last_emit = float("-inf")

    def _send(self, force: bool = False) -> None:
        now = self._clock()
        if force or now - self._last_emit >= 1 / PROGRESS_PER_S:
            self._last_emit = now
            self._emit(
                Download(self.file, self.bytes_downloaded, self.bytes_total, self.files_done, self.files_total)
            )

    def add_present(self, files: list[RemoteFile]) -> None:
        """Counts files already in the cache, before the download of the others starts."""
        self.bytes_downloaded += sum(f.size for f in files)
        self.files_done += len(files)

    def start_file(self, name: str) -> None:
        self.file = name
        self._send()

    def add_bytes(self, n: int) -> None:
        self._check()  # raising here stops huggingface_hub between two chunks
        self.bytes_downloaded += n
        self._send()

    def finish_file(self) -> None:
        self.files_done += 1
        self._send(force=self.files_done == self.files_total)


def _wanted(name: str) -> bool:
    if "/" in name:  # fnmatch's * spans slashes: *.safetensors would take every subfolder's too
        return name.count("/") == 1 and fnmatch.fnmatch(name, POOLING_CONFIG)
    return any(fnmatch.fnmatch(name, p) for p in MODEL_FILE_PATTERNS)


def _snapshot_folder(name: str, path: str) -> Path:
    """The snapshot folder holding the repo file ``name``, from that file's path."""
    return Path(path).parents[name.count("/")]


def fetch_model(
    repo_id: str,
    revision: str | None,
    emit: Callable[[Download], None],
    check: Callable[[], None] = lambda: None,
    check_weights: Callable[[int], None] = lambda n: None,
    on_downloaded: Callable[[int, float], None] = lambda nbytes, seconds: None,
) -> Path:
    """Downloads what is missing from the hub cache and returns the snapshot folder.

    A model that is already complete in the cache emits a single ``cached`` event.
    ``check`` runs between chunks and files; what it raises stops the download.
    ``check_weights`` gets the hub's byte count of the safetensors weights before
    anything is downloaded (what it raises, a model too large, stops it there).
    ``on_downloaded(bytes, seconds)`` hears of each download from the hub this
    worker made, whatever its end (not of files it found cached or another
    worker fetched).
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise ModelNotFound(f"{repo_id}@{revision or 'main'}: {type(e).__name__}") from e
    except Exception as e:  # hub unreachable: a complete cached copy still serves
        log.warning("hub unreachable for %s (%s); trying the local cache", repo_id, e)
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILE_PATTERNS), local_files_only=True))
        except LocalEntryNotFoundError:
            raise DownloadFailed(f"cannot reach the hub for {repo_id} and it is not cached: {e}") from e
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        count = sum(1 for p in folder.iterdir() if p.is_file())
        emit(Download(None, size, size, count, count, cached=True))
        return folder

    files = [RemoteFile(s.rfilename, s.size or 0) for s in info.siblings or [] if _wanted(s.rfilename)]
    if not any(f.name.endswith(".safetensors") for f in files):
        raise ModelNotSupported(f"{repo_id} has no safetensors weights")
    check_weights(sum(f.size for f in files if f.name.endswith(".safetensors")))
    # Small files first: the config and tokenizer land before the shards.
    files.sort(key=lambda f: (f.name.endswith(".safetensors"), f.name))
    size = sum(f.size for f in files)
    cached = _in_cache(repo_id, info.sha, files)
    if all(cached.values()):
        emit(Download(None, size, size, len(files), len(files), cached=True))
        return _snapshot_folder(*next(iter(cached.items())))

    with ModelDownloadLock(lock_dir(constants.HF_HUB_CACHE), lock_name(repo_id, info.sha), emit, check) as lock:
        # Another worker may have downloaded some or all of it while this one waited.
        cached = _in_cache(repo_id, info.sha, files)
        if all(cached.values()):
            followed = lock.followed
            if followed is None:  # nothing to relay: it was complete by the time we looked
                emit(Download(None, size, size, len(files), len(files), cached=True))
            elif (followed.bytes_downloaded, followed.files_done) != (size, len(files)):
                emit(Download(followed.file, size, size, len(files), len(files)))  # end at full size
            return _snapshot_folder(*next(iter(cached.items())))
        return _download_missing(repo_id, info.sha, files, cached, lock.publish, check, on_downloaded)


def _in_cache(repo_id: str, commit: str, files: list[RemoteFile]) -> dict[str, str | None]:
    """Each file's path in the hub cache, or None where it is missing."""
    from huggingface_hub import try_to_load_from_cache

    found = {f.name: try_to_load_from_cache(repo_id, f.name, revision=commit) for f in files}
    return {name: path if isinstance(path, str) else None for name, path in found.items()}


def _download_missing(
    repo_id: str,
    commit: str,
    files: list[RemoteFile],
    cached: dict[str, str | None],
    emit: Callable[[Download], None],
    check: Callable[[], None],
    on_downloaded: Callable[[int, float], None],
) -> Path:
    from huggingface_hub import constants, hf_hub_download

    constants.DOWNLOAD_CHUNK_SIZE = HUB_CHUNK_BYTES
    progress = DownloadProgress(files, emit, check=check)
    progress.add_present([f for f in files if cached[f.name]])
    present, started = progress.bytes_downloaded, time.monotonic()
    folder: Path | None = None
    try:
        for f in files:
            if cached[f.name]:
                continue
            check()
            progress.start_file(f.name)
            sink = functools.partial(_ByteSink, progress.add_bytes)
            try:
                path = hf_hub_download(repo_id, f.name, revision=commit, tqdm_class=sink)  # type: ignore[arg-type]
            except Exception as e:
                check()  # a cancel stops the download with the cancel, not as a failure
                raise DownloadFailed(f"{repo_id}/{f.name}: {e}") from e
            folder = _snapshot_folder(f.name, path)
            progress.finish_file()
    finally:
        on_downloaded(progress.bytes_downloaded - present, time.monotonic() - started)
    assert folder is not None
    return folder
