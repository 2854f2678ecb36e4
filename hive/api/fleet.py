"""The fleet as the API shows it: live workers (from their heartbeat hashes) and
the models they and the hive's own hub mirror hold."""

from __future__ import annotations

import json
import shutil

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from shared import keys
from shared.clock import RedisClock

_NUMBERS = ("memory_total", "memory_free", "memory_budget", "memory_used")


def _worker_view(record: dict[str, str], with_job: bool) -> dict:
    view = {
        "id": record["id"],
        "host": record.get("host"),
        "device": record.get("device"),
        "state": record.get("state"),
        "capacity": int(record.get("capacity") or 1),
        "running": int(record.get("running") or 0),
        "memory": {name.removeprefix("memory_"): int(float(record.get(name) or 0)) for name in _NUMBERS},
        "models": json.loads(record.get("models") or "[]"),
        "cached": json.loads(record.get("cached") or "[]"),
        "started_at": float(record.get("started_at") or 0),
        "last_heartbeat": float(record.get("last_heartbeat") or 0),
    }
    if with_job:
        view["current_job"] = record.get("current_job") or None
        view["jobs"] = json.loads(record.get("jobs") or "[]")
    return view


#: How the hive's own hub cache appears in ``cached_on``.
HIVE_CACHE = "hive"


def _cache_repos(cache_dir: str) -> list:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return [repo for repo in scan_cache_dir(cache_dir).repos if repo.repo_type == "model"]
    except CacheNotFound:
        return []


class Fleet:
    def __init__(self, connection: aioredis.Redis, clock: RedisClock, queue: str, hub_cache: str | None = None):
        """``hub_cache``: the cache the hive's ``/hub`` mirror serves, if it has one."""
        self.redis = connection
        self.clock = clock
        self.queue = queue
        self.hub_cache = hub_cache

    async def workers(self, with_jobs: bool) -> list[dict]:
        """Live workers: a heartbeat within WORKER_DEAD_AFTER_S (by Redis's clock, as the heartbeats)."""
        names = await self.redis.zrangebyscore(keys.workers(self.queue), self.clock.now() - keys.WORKER_DEAD_AFTER_S, "+inf")
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.worker(name))
            records = await pipe.execute()
        return [_worker_view(r, with_jobs) for r in records if r]

    async def models(self) -> list[dict]:
        """Every model a live worker holds in memory or in its hub cache, with where
        (revisions: the refs or commits seen)."""
        found: dict[str, dict] = {}

        def entry(m: dict) -> dict:
            item = found.setdefault(m["model"], {"model": m["model"], "revisions": [], "size_bytes": 0, "loaded_on": [], "cached_on": []})
            revision = m["revision"] or "main"
            if revision not in item["revisions"]:
                item["revisions"].append(revision)
            item["size_bytes"] = max(item["size_bytes"], m["size_bytes"])
            return item

        for worker in await self.workers(with_jobs=False):
            for m in worker["models"]:
                entry(m)["loaded_on"].append(worker["id"])
            for m in worker["cached"]:
                entry(m)["cached_on"].append(worker["id"])
        if self.hub_cache:
            for repo in await run_in_threadpool(_cache_repos, self.hub_cache):
                refs = sorted({ref for r in repo.revisions for ref in r.refs}) or [None]
                for ref in refs:
                    item = entry({"model": repo.repo_id, "revision": ref, "size_bytes": repo.size_on_disk})
                if HIVE_CACHE not in item["cached_on"]:
                    item["cached_on"].append(HIVE_CACHE)
        return sorted(found.values(), key=lambda m: m["model"])

    async def delete_cached(self, model: str) -> int:
        """Deletes ``model`` from the hive's hub cache and tells the workers to delete
        it from theirs (each one that does not hold it loaded does); returns how
        many workers heard it."""
        if self.hub_cache:
            for repo in await run_in_threadpool(_cache_repos, self.hub_cache):
                if repo.repo_id == model:
                    await run_in_threadpool(shutil.rmtree, repo.repo_path)
        return await self.redis.publish(keys.MODEL_DELETE_CHANNEL, model)
