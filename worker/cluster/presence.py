"""A worker's presence in the fleet: what it is, holds and does, for the hive's
routing and for ``GET /v1/workers``.

Every HEARTBEAT_S a thread rewrites the worker's hash (device, memory, models held,
state, its slots and running jobs; it expires after WORKER_DEAD_AFTER_S, so a dead
worker drops off by itself) and scores the worker in its queue's worker set. That
thread does nothing else: unloading a model (a garbage collection, an engine to
stop) runs on a thread of its own (worker/runtime.py), so many models expiring at
once cannot delay a heartbeat past the hive's patience. The worker's liveness goes
by the last heartbeat that got through (worker/cluster/liveness.py).

While it has a free slot, the worker is listed in the idle set of each model it
holds: the hive picks it from there for a job on that model when its slots are not
all taken (running jobs plus those routed to it and not yet taken) and routes the
job to the worker's own queue (warm routing, capacity-aware: hive/jobs/submit.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time

import redis
from rq import Queue as RQQueue

from shared import keys
from shared.clock import RedisClock
from shared.prefix_affinity import AFFINITY_TTL_S
from worker.engine.running_job import RunningJob, RunningJobs
from worker.model.download_lock import lock_dir, lock_name
from worker.model.loaded_models import LoadedModels, device_memory

log = logging.getLogger("worker.presence")

#: How long a cache delete waits for the model's download lock.
DELETE_WAIT_S = 5.0


def cached_models() -> list[dict]:
    """The models in this machine's hub cache (HF_HOME), by the refs they were fetched at."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    return [
        {"model": repo.repo_id, "revision": ref, "size_bytes": revision.size_on_disk}
        for repo in info.repos
        if repo.repo_type == "model"
        for revision in repo.revisions
        for ref in sorted(revision.refs) or [revision.commit_hash]
    ]


class Presence:
    def __init__(self, connection: redis.Redis, clock: RedisClock, name: str, queue: str, models: LoadedModels, ttl_s: int, running: RunningJobs):
        self.redis = connection
        self.clock = clock  # heartbeats are compared with the hive's reading of it
        self.running = running
        self.name = name
        self.queue = queue
        self.models = models
        self.ttl_s = ttl_s
        self.started_at = clock.now()
        self._shared_key = RQQueue(queue, connection=connection).key
        self._cached = json.dumps(cached_models())
        self._cache_changed = False
        self._lock = threading.Lock()
        #: When a heartbeat last reached Redis (time.monotonic()), and why the last one failed.
        self.last_beat_at = time.monotonic()
        self.last_beat_error: str | None = None
        models.on_unload = self._unloaded
        self._thread = threading.Thread(target=self._beat_forever, name="hive-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{keys.MODEL_DELETE_CHANNEL: self._on_delete})
        pubsub.run_in_thread(sleep_time=1.0, daemon=True, exception_handler=self._on_listener_error)

    @staticmethod
    def _on_listener_error(error: BaseException, pubsub, thread) -> None:
        # Listener loop boundary: keep listening once Redis is back.
        log.warning("model-delete listener: %s; reconnecting", error)
        threading.Event().wait(1.0)

    def _on_delete(self, message: dict) -> None:
        """``DELETE /v1/models/<id>``: delete it from this machine's hub cache,
        unless a job uses it (the hive refused if it is loaded: this is the race)."""
        data = message["data"]
        repo_id = data.decode() if isinstance(data, bytes) else data
        if any(m.repo_id == repo_id for m in self.models.held()):
            log.warning("not deleting %s from the hub cache: it is loaded", repo_id)
            return
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir()
        except CacheNotFound:
            return
        for repo in info.repos:
            if repo.repo_id == repo_id and repo.repo_type == "model":
                self._delete_repo(repo)
        with self._lock:
            self._cached = json.dumps(cached_models())
        self.beat()

    @property
    def own_queue(self) -> str:
        return keys.worker_queue(self.queue, self.name)

    def busy(self, job: RunningJob, routed_here: bool) -> None:
        """Took ``job`` (``routed_here``: from its own queue, so one claim is spent,
        in the same MULTI that counts the job running); with no slot left, no longer
        listed for any model."""
        full = self.running.free == 0
        with self.redis.pipeline(transaction=True) as pipe:
            if routed_here:
                pipe.decr(keys.worker_claims(self.name))
            for m in self.models.held() if full else ():
                pipe.zrem(keys.idle_with(self.queue, m.repo_id, m.revision), self.name)
            self._write(pipe)
            pipe.execute()

    def hold_prefixes(self, prefixes: list[str]) -> None:
        """This worker is where a job starting with these prefixes runs now
        (shared/prefix_affinity.py): the hive routes the next alike here."""
        pipe = self.redis.pipeline(transaction=False)
        for prefix in prefixes:
            pipe.set(keys.prefix_affinity(self.queue, prefix), self.name, ex=AFFINITY_TTL_S)
        pipe.execute()

    def slot_freed(self, job: RunningJob) -> None:
        """``job`` gave its slot back (just before its end goes out): listed again
        for every model kept, unless jobs already wait on the shared queue (a free
        slot takes the oldest of those next: a new job must not overtake them)."""
        with self._lock:
            rescan, self._cache_changed = self._cache_changed, False
        cached = json.dumps(cached_models()) if rescan else self._cached  # a walk of the cache: not after a warm job
        with self._lock:
            self._cached = cached
        now = self.clock.now()
        backlog = self.redis.llen(self._shared_key)
        with self.redis.pipeline(transaction=False) as pipe:
            for m in [] if backlog else self.models.kept():
                key = keys.idle_with(self.queue, m.repo_id, m.revision)
                pipe.zadd(key, {self.name: now})
                pipe.expire(key, self.ttl_s)
            self._write(pipe)
            pipe.execute()

    def _unloaded(self, repo_id: str, revision: str | None) -> None:
        try:
            self.redis.zrem(keys.idle_with(self.queue, repo_id, revision), self.name)
        except redis.RedisError as e:  # the claim checks liveness, the next job re-lists
            log.warning("could not leave the idle set of %s: %s", repo_id, e)

    @staticmethod
    def _delete_repo(repo) -> None:
        """Deletes the whole repo folder, under its download locks: workers sharing
        this cache all hear the delete, and one may be downloading it again.
        (Not ``delete_revisions()``: it goes by commit hash, which two mirrored copies
        of one model share.)"""
        from filelock import FileLock, Timeout
        from huggingface_hub import constants

        locks = [FileLock(lock_dir(constants.HF_HUB_CACHE) / f"{lock_name(repo.repo_id, r.commit_hash)}.lock") for r in repo.revisions]
        taken = []
        try:
            for lock in locks:
                # Another worker of this cache deleting it holds the lock a moment; one
                # downloading it, longer: then this delete gives way.
                lock.acquire(timeout=DELETE_WAIT_S)
                taken.append(lock)
            shutil.rmtree(repo.repo_path, ignore_errors=True)  # another worker of this cache may be at it
            log.info("deleted %s from the hub cache (%.1f MiB)", repo.repo_id, repo.size_on_disk / 2**20)
        except Timeout:
            log.warning("not deleting %s from the hub cache: it is being downloaded", repo.repo_id)
        finally:
            for lock in taken:
                lock.release()

    def beat(self, downloaded: bool = False) -> None:
        """``downloaded``: a job went to the hub, so the cache is rescanned when it ends."""
        if downloaded:
            with self._lock:
                self._cache_changed = True
        with self.redis.pipeline(transaction=False) as pipe:
            self._write(pipe)
            pipe.execute()
        self.last_beat_at = time.monotonic()

    def _write(self, pipe) -> None:
        with self._lock:
            cached = self._cached
        active = self.running.active()
        figures = [device_memory(d) for d in self.models.devices]
        free, total = sum(f for f, _ in figures), sum(t for _, t in figures)
        held = self.models.held()
        now = self.clock.now()
        pipe.hset(
            keys.worker(self.name),
            mapping={
                "id": self.name,
                "host": socket.gethostname(),
                "queue": self.queue,
                "device": ",".join(str(d) for d in self.models.devices),
                "state": "busy" if active else "idle",
                "current_job": active[0].job_id if active else "",
                "capacity": self.running.capacity,
                "running": len(active),
                "jobs": json.dumps([{"job_id": j.job_id, "model": j.model, "phase": j.phase} for j in active]),
                "memory_total": total,
                "memory_free": free,
                "memory_budget": self.models.budget_bytes,
                "memory_used": sum(m.size_bytes for m in held),
                "models": json.dumps(
                    [{"model": m.repo_id, "revision": m.revision, "size_bytes": m.size_bytes, "last_used": m.last_used, "in_use": m.in_use} for m in held]
                ),
                "cached": cached,
                "started_at": self.started_at,
                "last_heartbeat": now,
            },
        )
        pipe.expire(keys.worker(self.name), int(keys.WORKER_DEAD_AFTER_S) + 1)
        pipe.zadd(keys.workers(self.queue), {self.name: now})
        pipe.expire(keys.workers(self.queue), self.ttl_s)

    def leave(self) -> None:
        """A clean exit: off the lists at once rather than after three heartbeats."""
        with self.redis.pipeline(transaction=False) as pipe:
            for m in self.models.held():
                pipe.zrem(keys.idle_with(self.queue, m.repo_id, m.revision), self.name)
            pipe.zrem(keys.workers(self.queue), self.name)
            pipe.delete(keys.worker(self.name))
            pipe.execute()

    def _beat_forever(self) -> None:
        failing = False
        while True:
            time.sleep(keys.HEARTBEAT_S)
            try:
                self.beat()
                if failing:
                    # Back after an outage, maybe on another master with another clock.
                    self.clock.remeasure()
                    failing = False
                    self.last_beat_error = None
            except Exception as e:  # heartbeat loop boundary: Redis may be back next second
                log.warning("heartbeat failed: %s", e)
                self.last_beat_error = str(e) or type(e).__name__
                failing = True
