"""The hive's ``/hub`` as a pull-through mirror: workers with ``HF_ENDPOINT`` on the hive
and caches of their own pull a cold model through it, and the upstream hub (a slow,
access-logged ``python -m hive.hub.folders``) serves each file once."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import HfHubHTTPError

from tests import processes
from tests.sse import events, follow, status, submit
from tests.tiny_models import build_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

#: Slow enough that a 2 MB shard takes about 2 s, so that live progress shows.
UPSTREAM_BYTES_PER_S = 1_000_000
QUEUE = "hive:test-mirror"
_SERVED = re.compile(r'"GET /(\S+?)/resolve/\S+?/(\S+) HTTP/1.1" 200')


@dataclass
class Upstream:
    url: str
    root: Path
    proc: processes.Proc

    def served(self) -> Counter:
        """File bodies the upstream sent, by (repo, file), from its access log."""
        return Counter(_SERVED.findall(self.proc.log()))

    def files(self, model: str) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (self.root / model).iterdir()}


@dataclass
class Mirror:
    url: str
    cache: Path
    hive: processes.Proc

    @property
    def hub(self) -> str:
        return f"{self.url}/hub"


def start_mirror(name: str, upstream: Upstream, cache: Path, redis_url: str, log_dir: Path) -> Mirror:
    port = processes.free_port()
    command = processes.hive_command(
        "serve", "--redis-url", redis_url, "--port", str(port), "--queue", QUEUE, "--sse-ping-s", "1",
        "--hub-upstream", upstream.url, "--hub-cache", str(cache),
    )  # fmt: skip
    mirror = Mirror(f"http://127.0.0.1:{port}", cache, processes.start(name, command, log_dir))
    processes.wait_until(lambda: processes.health(mirror.url)["status"] == "ok", 30, name, (mirror.hive,))
    return mirror


@pytest.fixture(scope="module")
def upstream(log_dir, tmp_path_factory):
    """acme/mid (two shards of about 2 MB) under fresh names, cold for each test."""
    root = tmp_path_factory.mktemp("upstream")
    mid = build_model(root / "acme" / "mid", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2)
    for name in ("mid-cluster", "mid-concurrent", "mid-offline"):
        shutil.copytree(mid, root / "acme" / name)
    proc, url = processes.start_hub(root, log_dir, UPSTREAM_BYTES_PER_S, access_log=True, name="hub-upstream")
    yield Upstream(url, root, proc)
    proc.stop()


@pytest.fixture(scope="module")
def mirror(upstream, redis_url, log_dir, tmp_path_factory):
    """A hive with /hub on the upstream, and two workers that download only through it."""
    hive = start_mirror("hive-mirror", upstream, tmp_path_factory.mktemp("hive-cache"), redis_url, log_dir)
    workers = [
        processes.start(
            f"worker-mirror-{i}",
            processes.hive_command("worker", "--redis-url", redis_url, "--queue", QUEUE, "--device", "cpu", "--max-batch", "1"),  # one job each: both pull
            log_dir,
            env={"HF_ENDPOINT": hive.hub, "HF_HOME": str(tmp_path_factory.mktemp(f"hf-home-{i}")), "HF_HUB_DISABLE_TELEMETRY": "1"},
        )
        for i in range(2)
    ]
    try:
        processes.wait_until(
            lambda: processes.health(hive.url)["workers"] >= 2, processes.STARTUP_TIMEOUT_S, "mirror workers", (hive.hive, *workers)
        )
        yield hive
    finally:
        for proc in (*workers, hive.hive):
            proc.stop()


def downloads(received) -> list[dict]:
    return [r.json() | {"at": r.at} for r in events(received) if r.event == "download"]


def test_two_workers_pull_a_cold_model_through_the_hive_once(mirror, upstream):
    """Both jobs complete, on different workers; the first one's progress is live; each
    file crossed from the upstream once; the hive's cache holds the model."""
    model = "acme/mid-cluster"
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        first = submit(mirror.url, **body)
        first_stream = pool.submit(follow, mirror.url, first["sse_url"])
        # The second job starts while the first one's files are being pulled.
        processes.wait_until(lambda: status(mirror.url, first["job_id"])["state"] == "downloading", 30, "first download", (mirror.hive,))
        second = submit(mirror.url, **body)
        streams = [first_stream.result(), pool.submit(follow, mirror.url, second["sse_url"]).result()]

    for job, received in zip((first, second), streams):
        assert [r.event for r in events(received)][-1] == "end", events(received)[-3:]
        assert status(mirror.url, job["job_id"])["state"] == "completed"
    assert status(mirror.url, first["job_id"])["worker"] != status(mirror.url, second["job_id"])["worker"]

    files = upstream.files(model)
    progress = downloads(streams[0])
    assert not any(d["cached"] for d in progress)
    assert progress[-1]["bytes_downloaded"] == progress[-1]["bytes_total"] == sum(files.values())
    # Live: the biggest shard's bytes reached the worker while the upstream sent them,
    # not in one burst after the hive had fetched the whole file.
    shard = max((name for name in files if name.endswith(".safetensors")), key=files.get)
    arriving = [d for d in progress if d["file"] == shard]
    arriving = [d for d in arriving if d["bytes_downloaded"] > arriving[0]["bytes_downloaded"]]
    assert len(arriving) >= 3, arriving
    assert arriving[-1]["at"] - arriving[0]["at"] > 0.4 * files[shard] / UPSTREAM_BYTES_PER_S

    served = upstream.served()
    assert {name: served[(model, name)] for name in files} == {name: 1 for name in files}
    (repo,) = [r for r in scan_cache_dir(mirror.cache).repos if r.repo_id == model]
    (revision,) = repo.revisions
    assert revision.refs == {"main"}
    assert {f.file_name: f.size_on_disk for f in revision.files} == files


def test_a_missing_model_is_model_not_found(mirror):
    job = submit(mirror.url, model="acme/no-such-model", prompt="Hello", max_tokens=4)
    received = events(follow(mirror.url, job["sse_url"]))
    assert received[-1].event == "error"
    assert received[-1].json()["code"] == "MODEL_NOT_FOUND"


def test_concurrent_requests_for_one_file_stream_from_a_single_pull(mirror, upstream):
    """The first bytes reach every client at once, and the upstream sends the file once."""
    files = upstream.files("acme/mid-concurrent")
    shard = max((name for name in files if name.endswith(".safetensors")), key=files.get)
    url = f"{mirror.hub}/acme/mid-concurrent/resolve/main/{shard}"
    start = threading.Barrier(3)

    def fetch() -> tuple[bytes, float, float]:
        start.wait()
        began = time.monotonic()
        first_byte = None
        body = bytearray()
        with httpx.stream("GET", url, timeout=30) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                first_byte = first_byte or time.monotonic() - began
                body += chunk
        return bytes(body), first_byte, time.monotonic() - began

    with ThreadPoolExecutor(3) as pool:
        results = [f.result() for f in [pool.submit(fetch) for _ in range(3)]]
    expected = (upstream.root / "acme" / "mid-concurrent" / shard).read_bytes()
    for body, first_byte, total in results:
        assert body == expected
        assert first_byte < total / 3, (first_byte, total)
    assert upstream.served()[("acme/mid-concurrent", shard)] == 1
    # Now from the cache, ranges included (huggingface_hub resumes with them).
    response = httpx.get(url, headers={"Range": "bytes=10-19"}, timeout=10)
    assert response.status_code == 206 and response.content == expected[10:20]
    assert upstream.served()[("acme/mid-concurrent", shard)] == 1


def test_the_mirror_refuses_paths_outside_the_cache(mirror, upstream):
    for path in (
        "/acme/mid-cluster/resolve/..%2F..%2F..%2Fetc/passwd",
        "/acme/mid-cluster/resolve/main/..%2F..%2Fconfig.json",
        "/acme/..%2Fetc/resolve/main/config.json",
        "/api/models/acme/mid-cluster/revision/..%2F..",
        "/api/models/-acme/mid-cluster",
    ):
        assert httpx.get(f"{mirror.hub}{path}", timeout=10).status_code == 404, path
    assert ".." not in upstream.proc.log() and "-acme" not in upstream.proc.log()


def test_offline_the_hive_serves_the_models_it_holds(upstream, redis_url, log_dir, tmp_path):
    """The upstream gone, model_info and file bodies come from the hive's cache; a model
    it never pulled is a 502 (the worker then tries its own cache)."""
    root = tmp_path / "upstream"
    shutil.copytree(upstream.root / "acme" / "mid-offline", root / "acme" / "mid-offline")
    shutil.copytree(upstream.root / "acme" / "mid-offline", root / "acme" / "never-pulled")
    proc, url = processes.start_hub(root, log_dir, name="hub-offline")
    try:
        hive = start_mirror("hive-offline", Upstream(url, root, proc), tmp_path / "hive-cache", redis_url, log_dir)
        try:
            api = HfApi(endpoint=hive.hub)
            online = api.model_info("acme/mid-offline", files_metadata=True)
            for sibling in online.siblings:
                hf_hub_download("acme/mid-offline", sibling.rfilename, revision=online.sha, endpoint=hive.hub, cache_dir=tmp_path / "online")
            proc.stop()

            offline = api.model_info("acme/mid-offline", files_metadata=True)
            assert offline.sha == online.sha
            assert {(s.rfilename, s.size) for s in offline.siblings} == {(s.rfilename, s.size) for s in online.siblings}
            for sibling in offline.siblings:
                path = hf_hub_download("acme/mid-offline", sibling.rfilename, revision=offline.sha, endpoint=hive.hub, cache_dir=tmp_path / "offline")
                assert Path(path).read_bytes() == (root / "acme" / "mid-offline" / sibling.rfilename).read_bytes()
            with pytest.raises(HfHubHTTPError) as missing:
                api.model_info("acme/never-pulled")
            assert missing.value.response.status_code == 502
        finally:
            hive.hive.stop()
    finally:
        proc.stop()


def test_a_pull_cut_short_leaves_nothing_in_the_cache(upstream, redis_url, log_dir, tmp_path):
    """The upstream dies mid-file: the client's download breaks (it retries), and the
    hive keeps neither a blob nor a partial file."""
    root = tmp_path / "upstream"
    shutil.copytree(upstream.root / "acme" / "mid-offline", root / "acme" / "mid-cut")
    proc, url = processes.start_hub(root, log_dir, UPSTREAM_BYTES_PER_S, name="hub-cut")
    try:
        hive = start_mirror("hive-cut", Upstream(url, root, proc), tmp_path / "hive-cache", redis_url, log_dir)
        try:
            shard = "model-00001-of-00003.safetensors"
            received = 0
            url = f"{hive.hub}/acme/mid-cut/resolve/main/{shard}"
            with pytest.raises(httpx.HTTPError), httpx.stream("GET", url, timeout=30) as response:
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if proc.process.poll() is None:
                        proc.process.kill()
            assert 0 < received < (root / "acme" / "mid-cut" / shard).stat().st_size
            blobs = tmp_path / "hive-cache" / "models--acme--mid-cut" / "blobs"
            processes.wait_until(lambda: not any(blobs.iterdir()), 10, "the partial file's removal", (hive.hive,))
        finally:
            hive.hive.stop()
    finally:
        proc.stop()
