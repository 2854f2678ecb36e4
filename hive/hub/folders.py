"""A Hugging Face hub-compatible endpoint serving model folders from local disk.

Point ``HF_ENDPOINT`` at it and the real huggingface_hub client downloads from it:
``hive up`` serves its built-in demo model this way (mounted at ``/hub``), and the
tests serve the tiny models they generate (``python -m hive.hub.folders ROOT``).
Only the read API a download needs (``hub_routes``):
``GET /api/models/<org>/<name>[/revision/<rev>]`` and
``HEAD|GET /<org>/<name>/resolve/<rev>/<file>`` with the hub's headers.
``hive serve`` mounts the pull-through mirror (``hub_proxy.py``) on the same routes.

Layout of ``root``: ``<org>/<name>/<files>``. The commit hash is derived from the
files' contents, so it changes whenever a file does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.spec import MODEL_ID_PATTERN, REVISION_PATTERN

_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_REVISION = re.compile(REVISION_PATTERN)
_CHUNK = 64 * 1024


def valid_repo_id(repo_id: str) -> bool:
    return bool(_MODEL_ID.match(repo_id)) and ".." not in repo_id


def valid_revision(revision: str) -> bool:
    """A branch, tag or commit that is safe as a path under ``refs/`` (``refs/pr/1`` too)."""
    return bool(_REVISION.match(revision)) and all(part not in ("", ".", "..") for part in revision.split("/"))


def valid_filename(filename: str) -> bool:
    """A repo file name that stays inside its folder (``onnx/model.onnx`` too)."""
    return "\\" not in filename and "\0" not in filename and all(part not in ("", ".", "..") for part in filename.split("/"))


@dataclass(frozen=True)
class RepoFile:
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Repo:
    repo_id: str
    commit: str
    files: dict[str, RepoFile]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_repo(root: Path, repo_id: str) -> Repo | None:
    if not valid_repo_id(repo_id):
        return None
    folder = root / repo_id
    if not folder.is_dir():
        return None
    # Subfolders too (a sentence-transformers model's ``1_Pooling/config.json``), named as the hub names them.
    files = {
        p.relative_to(folder).as_posix(): RepoFile(p, p.stat().st_size, _sha256(p)) for p in sorted(folder.rglob("*")) if p.is_file()
    }
    commit = hashlib.sha1("".join(f"{n}:{f.sha256}\n" for n, f in files.items()).encode()).hexdigest()
    return Repo(repo_id, commit, files)


def not_found(code: str, message: str) -> Response:
    """A 404 as the hub sends it: huggingface_hub tells the kind from ``X-Error-Code``."""
    return JSONResponse({"error": message}, status_code=404, headers={"X-Error-Code": code})


def hub_routes(model_info, resolve) -> list[Route]:
    return [
        Route("/api/models/{org}/{name}", model_info),
        Route("/api/models/{org}/{name}/revision/{revision:path}", model_info),
        Route("/{org}/{name}/resolve/{revision}/{filename:path}", resolve, methods=["GET", "HEAD"]),
    ]


class FolderHub:
    """Builds the Starlette app; ``bytes_per_s`` throttles file bodies to mimic a
    slow link (tests use it to see several progress events per file)."""

    def __init__(self, root: str | Path, bytes_per_s: int = 0):
        self.root = Path(root)
        self.bytes_per_s = bytes_per_s
        self._cache: dict[str, tuple[float, Repo]] = {}

    def repo(self, repo_id: str) -> Repo | None:
        folder = self.root / repo_id
        try:
            stamp = max((p.stat().st_mtime for p in folder.iterdir()), default=0.0)
        except OSError:
            return None
        hit = self._cache.get(repo_id)
        if hit and hit[0] == stamp:
            return hit[1]
        repo = scan_repo(self.root, repo_id)
        if repo is not None:
            self._cache[repo_id] = (stamp, repo)
        return repo

    async def model_info(self, request: Request) -> Response:
        repo_id = f"{request.path_params['org']}/{request.path_params['name']}"
        repo = self.repo(repo_id)
        if repo is None:
            return not_found("RepoNotFound", f"Repository {repo_id} not found")
        revision = request.path_params.get("revision", "main")
        if revision not in ("main", repo.commit):
            return not_found("RevisionNotFound", f"Revision {revision} not found")
        siblings = [
            {"rfilename": name, "size": f.size, "blobId": f.sha256[:40], "lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}}
            for name, f in repo.files.items()
        ]
        return JSONResponse({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "siblings": siblings})

    async def resolve(self, request: Request) -> Response:
        p = request.path_params
        repo_id = f"{p['org']}/{p['name']}"
        repo = self.repo(repo_id)
        if repo is None:
            return not_found("RepoNotFound", f"Repository {repo_id} not found")
        if p["revision"] not in ("main", repo.commit):
            return not_found("RevisionNotFound", f"Revision {p['revision']} not found")
        entry = repo.files.get(p["filename"])
        if entry is None:
            return not_found("EntryNotFound", f"{p['filename']} not found in {repo_id}")
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": f'"{entry.sha256}"',
            "Accept-Ranges": "bytes",
            "Content-Length": str(entry.size),
        }
        if request.method == "HEAD":
            return Response(headers=headers)
        if not self.bytes_per_s:
            return FileResponse(entry.path, headers={k: v for k, v in headers.items() if k != "Content-Length"})
        return StreamingResponse(self._throttled(entry.path), headers=headers, media_type="application/octet-stream")

    async def _throttled(self, path: Path):
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk
                await asyncio.sleep(len(chunk) / self.bytes_per_s)

    def app(self) -> Starlette:
        return Starlette(routes=hub_routes(self.model_info, self.resolve))


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve model folders as a hub-compatible endpoint.")
    parser.add_argument("root", help="folder holding <org>/<name>/<files>")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7834)
    parser.add_argument("--bytes-per-s", type=int, default=0, help="throttle file bodies (0: no limit)")
    parser.add_argument("--access-log", action="store_true", help="log every request (tests count what was served)")
    args = parser.parse_args()
    uvicorn.run(
        FolderHub(args.root, args.bytes_per_s).app(),
        host=args.host,
        port=args.port,
        log_level="info" if args.access_log else "warning",
        access_log=args.access_log,
    )


if __name__ == "__main__":
    main()
