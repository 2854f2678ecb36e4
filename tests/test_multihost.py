"""Hive across hosts: Redis, the hive, two workers and a follower each in a network
namespace of their own (tests/netns.py), on a bridge, with loopback down everywhere
and a temp folder per host. The upstream hub sits behind the hive on a link of its
own, so the workers can only download through the hive's ``/hub``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from httpx_sse import connect_sse
from huggingface_hub import scan_cache_dir

from shared import job_record, keys
from tests import processes
from tests.netns import Host, NetnsUnavailable, Network, connected_to, ip, listening_on
from tests.sse import follow
from tests.tiny_models import build_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

ADMIN_KEY = "multihost-admin"
REDIS_PASSWORD = "multihost-secret"
MODEL = "acme/hosts"
#: A second small model: no worker holds it, so its jobs go on the shared queue.
SPARE_MODEL = "acme/hosts-spare"
#: About 16 MB: several seconds through the upstream, so a worker can be cut off mid-download.
BIG_MODEL = "acme/hosts-big"
#: Slow enough that a long job is still generating when its host is cut off.
TOKEN_DELAY_MS = 50
#: Slow enough that the second worker asks for the files while the first pull runs.
UPSTREAM_BYTES_PER_S = 2_000_000
HIVE_PORT = 7833
_SERVED = re.compile(r'"GET /(\S+?)/resolve/\S+?/(\S+) HTTP/1.1" 200')


@dataclass
class Cluster:
    net: Network
    url: str
    upstream: processes.Proc
    upstream_root: Path
    homes: dict[str, Path]  # each host's own folder
    log_dir: Path
    redis_url: str

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)

    def host(self, name: str) -> Host:
        return self.net.hosts[name]


def host_env(home: Path) -> dict[str, str]:
    """Nothing shared on disk: home, temp and Hugging Face folders of the host's own."""
    for sub in ("home", "tmp", "hf", "cache"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"), "HF_HOME": str(home / "hf"),
        "XDG_CACHE_HOME": str(home / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
    }  # fmt: skip


@contextmanager
def running_cluster(log_dir: Path, tmp_path_factory, prefix: str, worker_args: tuple[str, ...]) -> Iterator[Cluster]:
    """The five hosts and the upstream, each worker started with ``worker_args``;
    ``prefix`` names the processes' logs."""
    try:
        Network.probe()
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    net = Network()
    try:
        net.start()
        names = ("redis", "hive", "gpu-a", "gpu-b", "follower")
        hosts = {name: net.add_host(name) for name in names}
        upstream_host = net.add_private_host("upstream", via=hosts["hive"])
        homes = {name: tmp_path_factory.mktemp(f"{prefix}-{name}") for name in (*names, "upstream")}
        root = homes["upstream"] / "models"
        build_model(root / MODEL)
        build_model(root / SPARE_MODEL)
        build_model(root / BIG_MODEL, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=4)

        redis_url = f"redis://:{REDIS_PASSWORD}@{hosts['redis'].address}:6379/0"
        redis_proc = net.start_process(
            hosts["redis"], f"{prefix}-redis",
            ["redis-server", "--bind", hosts["redis"].address, "--port", "6379", "--requirepass", REDIS_PASSWORD,
             "--save", "", "--appendonly", "no", "--dir", str(homes["redis"])],
            log_dir,
        )  # fmt: skip
        upstream = net.start_process(
            upstream_host, f"{prefix}-upstream",
            [sys.executable, "-m", "hive.hub.folders", str(root), "--host", upstream_host.address, "--port", "8080",
             "--bytes-per-s", str(UPSTREAM_BYTES_PER_S), "--access-log"],
            log_dir, host_env(homes["upstream"]),
        )  # fmt: skip
        url = f"http://{hosts['hive'].address}:{HIVE_PORT}"
        hive = net.start_process(
            hosts["hive"], f"{prefix}-hive",
            processes.hive_command(
                "serve", "--redis-url", redis_url, "--host", hosts["hive"].address, "--port", str(HIVE_PORT),
                "--admin-keys", ADMIN_KEY, "--sse-ping-s", "1",
                "--hub-upstream", f"http://{upstream_host.address}:8080", "--hub-cache", str(homes["hive"] / "hub-cache"),
            ),
            log_dir, host_env(homes["hive"]),
        )  # fmt: skip
        workers = [
            net.start_process(
                hosts[name], f"{prefix}-worker-{name}",
                processes.hive_command(
                    "worker", "--redis-url", redis_url, "--device", "cpu", "--token-delay-ms", str(TOKEN_DELAY_MS), *worker_args
                ),
                log_dir, host_env(homes[name]) | {"HF_ENDPOINT": f"{url}/hub"},
            )  # fmt: skip
            for name in ("gpu-a", "gpu-b")
        ]
        everyone = (redis_proc, upstream, hive, *workers)
        processes.wait_until(lambda: "Uvicorn running on" in upstream.log(), 30, "upstream hub", everyone)
        processes.wait_until(
            lambda: processes.health(url).get("workers", 0) >= 2, processes.STARTUP_TIMEOUT_S, "hive and two workers", everyone
        )
        yield Cluster(net, url, upstream, root, homes, log_dir, redis_url)
    finally:
        net.close()


@pytest.fixture(scope="module")
def cluster(log_dir, tmp_path_factory):
    with running_cluster(log_dir, tmp_path_factory, "mh", ("--max-batch", "1")) as c:  # one job each: both pull, both run
        yield c


@pytest.fixture(scope="module")
def batching_cluster(log_dir, tmp_path_factory):
    """Workers that batch (the default --max-batch): an idle one waits on its queues
    with many slots at once."""
    with running_cluster(log_dir, tmp_path_factory, "mhb", ()) as c:
        yield c


def submit(api: httpx.Client, **body) -> dict:
    response = api.post("/v1/inference", json={"model": MODEL, "prompt": "Hello", "temperature": 0} | body)
    assert response.status_code == 202, response.text
    return response.json()


def status(api: httpx.Client, job_id: str) -> dict:
    response = api.get(f"/v1/inference/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_end(api: httpx.Client, job_id: str, timeout_s: float = 30) -> dict:
    final = {}

    def ended() -> bool:
        final.update(status(api, job_id))
        return final["state"] in ("completed", "failed", "cancelled")

    processes.wait_until(ended, timeout_s, f"job {job_id}")
    return final


def files_of(cluster: Cluster, model: str) -> set[str]:
    return {p.name for p in (cluster.upstream_root / model).iterdir()}


def workers_by_host(api: httpx.Client) -> dict[str, dict]:
    return {w["host"]: w for w in api.get("/v1/workers").json()["workers"]}


@pytest.mark.timeout(150)  # the first test also waits for the cluster to start
def test_workers_on_two_hosts_register_run_jobs_and_pull_each_file_once(cluster):
    with cluster.api() as api:
        listed = workers_by_host(api)
        assert set(listed) == {"gpu-a", "gpu-b"}
        # Heartbeats cross the bridge: each worker's record is refreshed.
        seen = {host: w["last_heartbeat"] for host, w in listed.items()}
        processes.wait_until(
            lambda: all(w["last_heartbeat"] > seen[h] for h, w in workers_by_host(api).items()), 5, "a second heartbeat from each"
        )

        # A cold model, two jobs at once: one worker each (one slot each), both pull through the hive.
        jobs = [submit(api, max_tokens=4) for _ in range(2)]
        finals = [wait_for_end(api, job["job_id"]) for job in jobs]
    assert [f["state"] for f in finals] == ["completed", "completed"], finals
    assert sorted(host_of(f["worker"]) for f in finals) == ["gpu-a", "gpu-b"]

    files = files_of(cluster, MODEL)
    served = Counter(_SERVED.findall(cluster.upstream.log()))
    assert {name: served[(MODEL, name)] for name in files} == {name: 1 for name in files}
    # Each host holds its own copy: the hive's /hub cache and each worker's HF_HOME.
    for cache in (cluster.homes["hive"] / "hub-cache", cluster.homes["gpu-a"] / "hf" / "hub", cluster.homes["gpu-b"] / "hf" / "hub"):
        (repo,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == MODEL]
        assert {f.file_name for rev in repo.revisions for f in rev.files} == files, cache


def test_nothing_uses_loopback_and_workers_only_dial_out(cluster):
    """Every loopback is down; servers listen on their host's address; a worker listens
    on nothing and talks to Redis and the hive's port only (what docs/deploying.md promises)."""
    for host in cluster.net.hosts.values():
        assert "state DOWN" in ip("-n", host.netns, "link", "show", "lo"), host.name
    redis_host, hive_host = cluster.host("redis"), cluster.host("hive")
    assert listening_on(redis_host) == [f"{redis_host.address}:6379"]
    assert listening_on(hive_host) == [f"{hive_host.address}:{HIVE_PORT}"]
    allowed = {f"{redis_host.address}:6379", f"{hive_host.address}:{HIVE_PORT}"}
    upstream = cluster.host("upstream").address
    for name in ("gpu-a", "gpu-b"):
        with pytest.raises(subprocess.CalledProcessError) as no_route:
            ip("-n", cluster.host(name).netns, "route", "get", upstream)
        assert "unreachable" in no_route.value.stderr  # only the hive has a route to the upstream
        assert listening_on(cluster.host(name)) == []
        dialled = connected_to(cluster.host(name))
        assert f"{redis_host.address}:6379" in dialled and dialled <= allowed, dialled


def follow_from(cluster: Cluster, host: Host, name: str, sse_url: str, *args: str) -> list[dict]:
    """Follows a stream from a process on ``host``; its events, [DONE] included."""
    proc = cluster.net.start_process(
        host, name, [sys.executable, "-m", "tests.sse_follower", cluster.url, sse_url, *args], cluster.log_dir, host_env(cluster.homes[host.name])
    )
    assert proc.process.wait(30) == 0, proc.log()
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]


def test_a_follower_on_a_fifth_host_streams_and_resumes(cluster):
    follower = cluster.host("follower")
    with cluster.api() as api:
        job = submit(api, max_tokens=60)  # 3 s: the second follower joins while it generates
    first = follow_from(cluster, follower, "mh-follow-1", job["sse_url"], "--limit", "6")
    assert len(first) == 6 and first[-1]["data"] != "[DONE]"
    rest = follow_from(cluster, follower, "mh-follow-2", job["sse_url"], "--last-event-id", first[-1]["id"])
    received = first + rest
    assert received[-1]["data"] == "[DONE]" and received[-2]["event"] == "end"
    ids = [int(r["id"]) for r in received[:-1]]
    assert ids == list(range(1, len(ids) + 1))  # resumed exactly after the last id: no gap, no repeat
    assert sum(r["event"] == "token" for r in received) == 60


def host_of(worker: str) -> str:
    return worker.split(":")[0]  # worker names start with their host's name


def stream_and_cut(cluster: Cluster, api: httpx.Client, job: dict, cut_when) -> tuple[list[tuple], Host, float]:
    """Follows the job from here; the first time ``cut_when(received)`` holds, pulls the
    cable of the host whose worker runs it. Returns the events ``(id, event, data, at)``,
    the host cut off and when."""
    received, cut, cut_at = [], None, 0.0
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{cluster.url}{job['sse_url']}") as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            received.append((sse.id, sse.event, sse.data, time.monotonic()))
            if sse.data == "[DONE]":
                break
            if cut is None and cut_when(received):
                cut = cluster.host(host_of(status(api, job["job_id"])["worker"]))
                cluster.net.cut(cut)
                cut_at = time.monotonic()
    assert cut is not None, received
    return received, cut, cut_at


def rejoins(cluster: Cluster, api: httpx.Client, host: Host) -> float:
    """Puts the host's cable back; seconds until its worker is listed with a free slot."""
    cluster.net.restore(host)
    restored_at = time.monotonic()
    processes.wait_until(lambda: workers_by_host(api).get(host.name, {}).get("running") == 0, 30, f"{host.name} back, idle")
    return time.monotonic() - restored_at


def test_a_worker_cut_off_mid_generation_ends_its_job_with_worker_lost(cluster):
    """A worker's cable is pulled while it generates: its job ends with WORKER_LOST (it had
    tokens, so no retry) within 10 s, the other worker serves on, and once the cable is
    back the worker rejoins and writes nothing more to the job it lost."""
    with cluster.api() as api:
        jobs = [submit(api, max_tokens=400) for _ in range(2)]  # 20 s each: one on each worker
        processes.wait_until(lambda: all(status(api, j["job_id"])["state"] == "running" for j in jobs), 20, "both long jobs running")
        lost, survivor = jobs
        received, cut, cut_at = stream_and_cut(cluster, api, lost, lambda r: sum(e[1] == "token" for e in r) == 3)
        try:
            error = received[-2]
            assert error[1] == "error" and json.loads(error[2])["code"] == "WORKER_LOST", received[-3:]
            assert status(api, lost["job_id"])["state"] == "failed"
            worker_lost_s = error[3] - cut_at
            assert worker_lost_s < 10
            other = ({"gpu-a", "gpu-b"} - {cut.name}).pop()
            assert set(workers_by_host(api)) == {other}  # silent for over 3 s: off the list

            # The other host never noticed: its job runs on until cancelled, then it takes a new one.
            assert status(api, survivor["job_id"])["state"] == "running"
            assert api.delete(f"/v1/inference/{survivor['job_id']}").status_code == 202
            assert wait_for_end(api, survivor["job_id"])["state"] == "cancelled"
            final = wait_for_end(api, submit(api, max_tokens=4)["job_id"])
            assert final["state"] == "completed" and host_of(final["worker"]) == other, final
        finally:
            back_s = rejoins(cluster, api, cut)
        after = status(api, lost["job_id"])
    assert after["state"] == "failed" and after["error"]["code"] == "WORKER_LOST", after
    replay = [r for r in follow(cluster.url, lost["sse_url"]) if not r.done]
    assert [(r.id, r.event, r.data) for r in replay] == [r[:3] for r in received[:-1]]
    print(f"\n{cut.name} cut mid-generation: WORKER_LOST after {worker_lost_s:.2f} s; rejoined {back_s:.2f} s after the cable was back")


@pytest.mark.timeout(90)
def test_a_worker_cut_off_mid_download_hands_its_job_to_the_other(cluster):
    """A worker's cable is pulled while it pulls a cold model through the hive: no token
    yet, so the job is queued again (a ``retry`` event) within 10 s, the other worker
    downloads and runs it in the same stream, and the upstream still serves each file once."""
    with cluster.api() as api:
        job = submit(api, model=BIG_MODEL, max_tokens=3)
        in_flight = lambda r: r[-1][1] == "download" and json.loads(r[-1][2])["bytes_downloaded"] > 0  # noqa: E731
        received, cut, cut_at = stream_and_cut(cluster, api, job, in_flight)
        try:
            kinds = [r[1] for r in received]
            assert "retry" in kinds and kinds[-2] == "end" and kinds.count("token") == 3, kinds
            retry = received[kinds.index("retry")]
            assert json.loads(retry[2])["attempt"] == 2
            retry_s = retry[3] - cut_at
            assert retry_s < 10
        finally:
            back_s = rejoins(cluster, api, cut)
        # Back, the cut worker abandons the job it no longer holds rather than failing it.
        final = status(api, job["job_id"])
    assert final["state"] == "completed" and final["attempt"] == 2 and host_of(final["worker"]) != cut.name, final
    ids = [int(r[0]) for r in received[:-1]]
    assert ids == list(range(1, len(ids) + 1))  # one stream across both attempts
    served = Counter(_SERVED.findall(cluster.upstream.log()))
    assert {name: served[(BIG_MODEL, name)] for name in files_of(cluster, BIG_MODEL)} == {name: 1 for name in files_of(cluster, BIG_MODEL)}
    print(f"\n{cut.name} cut mid-download: retry after {retry_s:.2f} s; rejoined {back_s:.2f} s after the cable was back")


def wait_for_ends(api: httpx.Client, job_ids: list[str], timeout_s: float) -> list[dict]:
    """The jobs' final statuses; a failure lists those that did not end."""
    ends: dict[str, dict] = {}

    def all_ended() -> bool:
        for job_id in job_ids:
            if job_id not in ends and (final := status(api, job_id))["state"] in ("completed", "failed", "cancelled"):
                ends[job_id] = final
        return len(ends) == len(job_ids)

    try:
        processes.wait_until(all_ended, timeout_s, "the jobs")
    except TimeoutError:
        pytest.fail(f"not ended within {timeout_s} s: {[status(api, j) for j in job_ids if j not in ends]}")
    return [ends[job_id] for job_id in job_ids]


def redis_now(db: redis.Redis) -> float:
    """Redis's clock, which every time in a job's record is on (shared/clock.py)."""
    seconds, microseconds = db.time()
    return seconds + microseconds / 1e6


#: From a cut to a job's end on the other host: the dead-worker window (3 s without
#: a heartbeat, then a reaper period or two) and a cold load on the other host, with
#: room for a loaded 2-core machine.
AFTER_CUT_S = 15


@pytest.mark.timeout(180)  # the cluster starts first
def test_jobs_routed_to_or_queued_behind_a_cut_worker_run_on_the_other(batching_cluster):
    """Batching workers wait on their queues with many slots at once; one host holds the
    only loaded copy of the model and is cut off mid-generation. Its job ends with
    WORKER_LOST, and every job submitted after the cut (routed warm to the cut worker's
    own queue, queued on the shared one before or after the hive calls it dead) runs
    on the other host, which loads the model, within the dead-worker window."""
    cluster = batching_cluster
    with cluster.api() as api, redis.Redis.from_url(cluster.redis_url) as db:
        first = wait_for_end(api, submit(api, max_tokens=4)["job_id"])  # cold: one worker pulls and loads it
        assert first["state"] == "completed", first
        holder = first["worker"]
        other = ({"gpu-a", "gpu-b"} - {host_of(holder)}).pop()
        lost = submit(api, max_tokens=400)  # 20 s: routed warm to the holder, which has free slots
        processes.wait_until(lambda: status(api, lost["job_id"])["state"] == "running", 20, "the long job running")
        assert status(api, lost["job_id"])["worker"] == holder
        assert not any(m["model"] == MODEL for m in workers_by_host(api)[other]["models"])

        received, warm, spare = [], [], []
        with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{cluster.url}{lost['sse_url']}") as source:
            for sse in source.iter_sse():
                if not sse.data:
                    continue
                received.append((sse.id, sse.event, sse.data, time.monotonic()))
                if sse.data == "[DONE]":
                    break
                if not warm and sum(e[1] == "token" for e in received) == 3:
                    cut = cluster.host(host_of(holder))
                    cluster.net.cut(cut)
                    cut_at, cut_clock = time.monotonic(), redis_now(db)
                    # At once, while its heartbeat is fresh: routed warm to its own queue.
                    warm.append(submit(api, max_tokens=4)["job_id"])
                    routed_to = db.hget(keys.job(warm[0]), job_record.RQ_QUEUE).decode()
                    # No one holds this one: the shared queue, which the cut worker's
                    # free slots wait on too.
                    spare.extend(submit(api, model=SPARE_MODEL, max_tokens=4)["job_id"] for _ in range(2))
        assert warm, received
        try:
            assert routed_to == keys.worker_queue(keys.DEFAULT_QUEUE, holder)
            error = received[-2]
            assert error[1] == "error" and json.loads(error[2])["code"] == "WORKER_LOST", received[-3:]
            worker_lost_s = error[3] - cut_at
            assert worker_lost_s < 10
            processes.wait_until(lambda: cut.name not in workers_by_host(api), 10, "the cut worker off the list")
            # Called dead: the shared queue again, the other worker holding no copy.
            later = [submit(api, max_tokens=4)["job_id"] for _ in range(2)]
            finals = wait_for_ends(api, warm + spare + later, 2 * AFTER_CUT_S)
        finally:
            back_s = rejoins(cluster, api, cut)
        # Its link back, the cut worker leaves them as they ended.
        again = [status(api, f["job_id"]) for f in finals]
    assert all(f["state"] == "completed" and host_of(f["worker"]) == other for f in finals), finals
    assert again == finals
    after_cut = [round(f["finished_at"] - cut_clock, 2) for f in finals]
    assert max(after_cut) <= AFTER_CUT_S, after_cut
    print(
        f"\n{cut.name} cut with the only loaded copy: WORKER_LOST after {worker_lost_s:.2f} s; the jobs submitted after"
        f" the cut ended on {other} {after_cut[0]} s (routed warm to the cut worker), {after_cut[1:3]} s (shared queue,"
        f" before it was called dead), {after_cut[3:]} s (after) from the cut; rejoined {back_s:.2f} s after the cable was back"
    )
