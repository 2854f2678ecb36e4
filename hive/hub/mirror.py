"""The hive's ``/hub``: a pull-through mirror of the Hugging Face hub.

Workers started with ``HF_ENDPOINT=http://<hive>/hub`` download through the hive, so a
cluster fetches each model file from the internet once. What the hive pulled lives in a
standard Hugging Face cache folder (``models--org--name/{blobs,snapshots,refs}``), the
layout ``huggingface_hub.scan_cache_dir`` and ``hf cache`` read.

- Metadata (``/api/models/...`` and the HEAD of each file) always comes from the upstream,
  with the client's ``Authorization``: the upstream decides who may read a gated or private
  repo, also for files already cached, and a branch resolves to its current commit. Only
  when the upstream cannot be reached (or fails with a 5xx) does the cache answer, so a
  cluster keeps loading the models it holds while offline.
- A file body not yet cached is pulled once, by a background task that writes it to
  ``blobs/<etag>.<random>.incomplete``. Every request for it meanwhile, the first and any
  concurrent ones, streams from that file as it grows: each worker's progress is live, and
  none waits in silence past its read timeout (huggingface_hub gives up after 10 s). The
  blob enters the cache only once its size, and for LFS files its sha256, match what the
  upstream announced; until then the last byte is held back, so no client ever holds a
  complete file that the cache rejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from hive.hub.folders import hub_routes, not_found, valid_filename, valid_repo_id, valid_revision

log = logging.getLogger("hive.hub")

_COMMIT = re.compile(r"[0-9a-f]{40}")
#: The hub names a file by its git blob sha1, or by its sha256 when it is stored in LFS.
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: Short, so that an unreachable upstream falls back to the cache before the client
#: (huggingface_hub waits 10 s for metadata) gives up on the hive.
METADATA_TIMEOUT = httpx.Timeout(5.0)
#: A file body that sends nothing for a minute has failed.
BODY_TIMEOUT = httpx.Timeout(10.0, read=60.0)
_CHUNK = 256 * 1024
_MAX_REDIRECTS = 5
#: Upstream error headers huggingface_hub reads to tell a missing repo from a gated one.
_ERROR_HEADERS = ("content-type", "x-error-code", "x-error-message")


class PullFailed(Exception):
    pass


@dataclass(frozen=True)
class FileMeta:
    """One file at one commit, as the hub's HEAD describes it."""

    commit: str
    etag: str
    size: int

    @property
    def lfs(self) -> bool:
        return len(self.etag) == 64

    def sibling_fields(self) -> dict:
        """What model_info says of the file beyond its name and size."""
        if not self.lfs:
            return {"blobId": self.etag}
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.etag}\nsize {self.size}\n"
        return {"lfs": {"sha256": self.etag, "size": self.size, "pointerSize": len(pointer)}}

    def headers(self) -> dict[str, str]:
        """What ``huggingface_hub.file_download.get_hf_file_metadata`` reads: the commit,
        the etag naming the blob and the size; for LFS files also the X-Linked-* pair the
        hub sends with its redirect to the CDN."""
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{self.etag}"', "Content-Length": str(self.size)}
        if self.lfs:
            headers |= {"X-Linked-Etag": f'"{self.etag}"', "X-Linked-Size": str(self.size)}
        return headers


class HubCache:
    """Paths in a Hugging Face cache folder, laid out as huggingface_hub lays them out."""

    def __init__(self, root: Path):
        self.root = root

    def repo(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def blob(self, repo_id: str, etag: str) -> Path:
        return self.repo(repo_id) / "blobs" / etag

    def commit(self, repo_id: str, revision: str) -> str | None:
        if _COMMIT.fullmatch(revision):
            return revision
        try:
            commit = (self.repo(repo_id) / "refs" / revision).read_text().strip()
        except OSError:
            return None
        return commit if _COMMIT.fullmatch(commit) else None

    def set_ref(self, repo_id: str, revision: str, commit: str) -> None:
        """``refs/<revision>`` names ``commit``; its snapshot folder must exist, or
        scan_cache_dir reports the repo as corrupted."""
        if revision == commit:
            return
        (self.repo(repo_id) / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        ref = self.repo(repo_id) / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)

    def link(self, repo_id: str, revision: str, filename: str, meta: FileMeta) -> None:
        """``snapshots/<commit>/<filename>`` → its blob (a relative symlink, as
        huggingface_hub makes them), and the revision's ref."""
        pointer = self.repo(repo_id) / "snapshots" / meta.commit / filename
        target = os.path.relpath(self.blob(repo_id, meta.etag), pointer.parent)
        if not (pointer.is_symlink() and os.readlink(pointer) == target):
            pointer.parent.mkdir(parents=True, exist_ok=True)
            staged = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
            staged.unlink(missing_ok=True)
            os.symlink(target, staged)
            os.replace(staged, pointer)
        self.set_ref(repo_id, revision, meta.commit)

    def cached(self, repo_id: str, revision: str, filename: str) -> FileMeta | None:
        commit = self.commit(repo_id, revision)
        if commit is None:
            return None
        pointer = self.repo(repo_id) / "snapshots" / commit / filename
        try:  # the first hop names the blob (it may link on, into a shared store)
            blob = pointer.parent / os.readlink(pointer)
            return FileMeta(commit, blob.name, blob.stat().st_size)
        except OSError:
            return None

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, FileMeta]] | None:
        """The files held for a revision, by name; None when there are none."""
        commit = self.commit(repo_id, revision)
        if commit is None:
            return None
        folder = self.repo(repo_id) / "snapshots" / commit
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = {name: meta for name in names if (meta := self.cached(repo_id, commit, name)) is not None}
        return (commit, files) if files else None


@dataclass(eq=False)
class Pull:
    """One file body on its way from the upstream into the cache; its followers read
    ``path`` as it grows."""

    meta: FileMeta
    path: Path
    #: (revision, filename) pairs to link once the blob is in: one per distinct request.
    links: set[tuple[str, str]] = field(default_factory=set)
    written: int = 0
    done: bool = False
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def readable(self) -> int:
        """Bytes a follower may send: all of them once the blob is verified, all but the last before."""
        return self.written if self.done else min(self.written, self.meta.size - 1)


def _normalize_etag(etag: str | None) -> str:
    return (etag or "").removeprefix("W/").strip('"')


def _commit_of(model_info: httpx.Response) -> str | None:
    try:
        info = model_info.json()
    except ValueError:
        return None
    commit = str(info.get("sha", "")) if isinstance(info, dict) else ""
    return commit if _COMMIT.fullmatch(commit) else None


def _upstream_error(response: httpx.Response) -> Response:
    headers = {k: v for k, v in response.headers.items() if k.lower() in _ERROR_HEADERS}
    return Response(response.content, status_code=response.status_code, headers=headers)


def _unavailable(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=502, headers={"X-Error-Code": "UpstreamUnavailable"})


class PullThroughMirror:
    """Serves ``cache_dir`` on the hub's routes and fills it from ``upstream`` on a miss."""

    def __init__(self, upstream: str, cache_dir: str | Path):
        self.upstream = upstream.rstrip("/")
        self.cache = HubCache(Path(cache_dir))
        self._client = httpx.AsyncClient(headers={"User-Agent": "hive-hub-mirror"})
        self._pulls: dict[Path, Pull] = {}
        self._tasks: set[asyncio.Task] = set()

    def app(self) -> Starlette:
        return Starlette(routes=hub_routes(self.model_info, self.resolve))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    @staticmethod
    def _forwarded(request: Request) -> dict[str, str]:
        """The client's credentials (its HF_TOKEN) go to the upstream: gated repos stay gated."""
        auth = request.headers.get("authorization")
        return {"Authorization": auth} if auth else {}

    async def model_info(self, request: Request) -> Response:
        repo_id = f"{request.path_params['org']}/{request.path_params['name']}"
        revision = request.path_params.get("revision")
        if not valid_repo_id(repo_id):
            return not_found("RepoNotFound", f"Repository {repo_id} not found")
        if revision is not None and not valid_revision(revision):
            return not_found("RevisionNotFound", f"Revision {revision} not found")
        url = f"{self.upstream}/api/models/{repo_id}"
        if revision is not None:
            url += f"/revision/{quote(revision, safe='')}"
        if request.url.query:  # ?blobs=true: sizes and LFS hashes, what HfApi(files_metadata=True) asks
            url += f"?{request.url.query}"
        try:
            response = await self._client.get(url, headers=self._forwarded(request), follow_redirects=True, timeout=METADATA_TIMEOUT)
        except httpx.TransportError as e:
            return self._model_info_from_cache(repo_id, revision or "main", f"cannot reach {self.upstream}: {e!r}")
        if response.status_code >= 500:
            return self._model_info_from_cache(repo_id, revision or "main", f"{self.upstream} answered {response.status_code}")
        if response.status_code != 200:
            return _upstream_error(response)
        commit = _commit_of(response)
        if commit is not None:  # offline, the cache answers for this revision with this commit
            self.cache.set_ref(repo_id, revision or "main", commit)
        return Response(response.content, headers={"Content-Type": response.headers.get("content-type", "application/json")})

    def _model_info_from_cache(self, repo_id: str, revision: str, reason: str) -> Response:
        """The files the hive holds for that revision: what a worker needs to load a model
        the cluster has run before."""
        held = self.cache.snapshot(repo_id, revision)
        if held is None:
            return _unavailable(f"{reason}; {repo_id}@{revision} is not in the hive's cache")
        log.warning("%s; answering for %s@%s from the cache", reason, repo_id, revision)
        commit, files = held
        siblings = [{"rfilename": name, "size": meta.size, **meta.sibling_fields()} for name, meta in files.items()]
        return JSONResponse({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings})

    async def resolve(self, request: Request) -> Response:
        p = request.path_params
        repo_id, revision, filename = f"{p['org']}/{p['name']}", p["revision"], p["filename"]
        if not valid_repo_id(repo_id):
            return not_found("RepoNotFound", f"Repository {repo_id} not found")
        if not valid_revision(revision):
            return not_found("RevisionNotFound", f"Revision {revision} not found")
        if not valid_filename(filename):
            return not_found("EntryNotFound", f"{filename} not found in {repo_id}")
        meta = await self._file_meta(request, repo_id, revision, filename)
        if isinstance(meta, Response):
            return meta
        if request.method == "HEAD":
            return Response(headers=meta.headers())
        blob = self.cache.blob(repo_id, meta.etag)
        pull = self._pulls.get(blob)
        if pull is None and not blob.exists():
            pull = self._start_pull(request, repo_id, filename, meta)
        if pull is None:
            self.cache.link(repo_id, revision, filename, meta)
            headers = {k: v for k, v in meta.headers().items() if k != "Content-Length"}  # FileResponse sizes ranges itself
            return FileResponse(blob, headers=headers, media_type="application/octet-stream")
        pull.links.add((revision, filename))
        # Opened now, before any other request runs: the pull may finish (and move the
        # file into blobs/) before the body starts; an open file survives the move.
        return StreamingResponse(self._follow(pull, pull.path.open("rb")), headers=meta.headers(), media_type="application/octet-stream")

    async def _file_meta(self, request: Request, repo_id: str, revision: str, filename: str) -> FileMeta | Response:
        url = f"{self.upstream}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
        headers = self._forwarded(request) | {"Accept-Encoding": "identity"}  # the real size, not a compressed one
        try:
            response = await self._head(url, headers)
        except httpx.TransportError as e:
            return self._file_meta_from_cache(repo_id, revision, filename, f"cannot reach {self.upstream}: {e!r}")
        if response.status_code >= 500:
            return self._file_meta_from_cache(repo_id, revision, filename, f"{self.upstream} answered {response.status_code}")
        if response.status_code >= 400:
            return _upstream_error(response)
        commit = response.headers.get("X-Repo-Commit", "")
        etag = _normalize_etag(response.headers.get("X-Linked-Etag") or response.headers.get("ETag"))
        size = response.headers.get("X-Linked-Size") or ("" if response.is_redirect else response.headers.get("Content-Length", ""))
        if not (_COMMIT.fullmatch(commit) and _ETAG.fullmatch(etag) and size.isdigit()):
            return _unavailable(f"{self.upstream} described {repo_id}/{filename} without a commit, etag or size")
        return FileMeta(commit, etag, int(size))

    async def _head(self, url: str, headers: dict[str, str]) -> httpx.Response:
        """HEAD, following the hub's relative redirects (a renamed repo) but not the
        absolute one to its CDN: that answer carries the X-Linked-* headers."""
        for _ in range(_MAX_REDIRECTS):
            response = await self._client.head(url, headers=headers, timeout=METADATA_TIMEOUT)
            location = response.headers.get("Location", "")
            if not (response.is_redirect and location.startswith("/")):
                break
            url = str(response.url.join(location))
        return response

    def _file_meta_from_cache(self, repo_id: str, revision: str, filename: str, reason: str) -> FileMeta | Response:
        meta = self.cache.cached(repo_id, revision, filename)
        if meta is None:
            return _unavailable(f"{reason}; {repo_id}@{revision}/{filename} is not in the hive's cache")
        log.warning("%s; serving %s/%s from the cache", reason, repo_id, filename)
        return meta

    def _start_pull(self, request: Request, repo_id: str, filename: str, meta: FileMeta) -> Pull:
        blob = self.cache.blob(repo_id, meta.etag)
        blob.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: another hive process sharing the cache may pull the same blob.
        fd, path = tempfile.mkstemp(dir=blob.parent, prefix=f"{meta.etag}.", suffix=".incomplete")
        pull = Pull(meta, Path(path))
        self._pulls[blob] = pull
        # The pull outlives the request that started it: other workers may be following
        # it, and one whose download was cut (a cancelled job, a retry) asks again.
        task = asyncio.create_task(self._pull(repo_id, filename, pull, os.fdopen(fd, "wb"), self._forwarded(request)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pull

    async def _pull(self, repo_id: str, filename: str, pull: Pull, out: BinaryIO, headers: dict[str, str]) -> None:
        meta = pull.meta
        url = f"{self.upstream}/{repo_id}/resolve/{meta.commit}/{quote(filename)}"
        sha256 = hashlib.sha256() if meta.lfs else None
        started = time.monotonic()
        log.info("pulling %s/%s (%d bytes) from %s", repo_id, filename, meta.size, self.upstream)
        try:
            with out:
                async with self._client.stream("GET", url, headers=headers, follow_redirects=True, timeout=BODY_TIMEOUT) as response:
                    if response.status_code != 200:
                        raise PullFailed(f"{self.upstream} answered {response.status_code}")
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
                        out.flush()  # followers read the file through handles of their own
                        if sha256 is not None:
                            sha256.update(chunk)
                        pull.written += len(chunk)
                        pull.notify()
            if pull.written != meta.size:
                raise PullFailed(f"got {pull.written} bytes, expected {meta.size}")
            if sha256 is not None and sha256.hexdigest() != meta.etag:
                raise PullFailed(f"sha256 {sha256.hexdigest()} is not the announced {meta.etag}")
            os.replace(pull.path, self.cache.blob(repo_id, meta.etag))
            for revision, name in pull.links:
                self.cache.link(repo_id, revision, name, meta)
            pull.done = True
            log.info("pulled %s/%s in %.1f s", repo_id, filename, time.monotonic() - started)
        except (httpx.HTTPError, OSError, PullFailed) as e:
            pull.error = f"pulling {repo_id}/{filename} failed: {e!r}"
            log.warning("%s", pull.error)
        except Exception:  # the task's boundary: its followers must hear of any failure
            pull.error = f"pulling {repo_id}/{filename} failed"
            log.exception("%s", pull.error)
        finally:
            if not pull.done and pull.error is None:
                pull.error = f"pulling {repo_id}/{filename} was interrupted"
            pull.path.unlink(missing_ok=True)
            del self._pulls[self.cache.blob(repo_id, meta.etag)]
            pull.notify()

    async def _follow(self, pull: Pull, source: BinaryIO) -> AsyncIterator[bytes]:
        """The pull's bytes as they land. A failed pull ends the response short of its
        Content-Length, so the client sees a broken download, retries, and starts a new pull."""
        with source:
            sent = 0
            while True:
                changed = pull.changed  # taken before reading the state: no wake-up is missed
                readable = pull.readable()
                if sent < readable:
                    chunk = source.read(min(readable - sent, _CHUNK))
                    if not chunk:
                        raise PullFailed(f"{pull.path} is shorter than the {readable} bytes written")
                    sent += len(chunk)
                    yield chunk
                elif pull.error is not None:
                    raise PullFailed(pull.error)
                elif pull.done:
                    return
                else:
                    await changed.wait()
