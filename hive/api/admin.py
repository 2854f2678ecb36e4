"""Admin endpoints the `hive` CLI uses beyond the public API: the jobs of the
cluster (newest first, from the jobs index written at submit), and its queues
with their lengths and a purge that cancels every job waiting on one.

A key lists its own jobs; admin keys (and local mode) list everyone's. A purge
goes through JobService.cancel, job by job, so each purged job's stream ends with
``error`` ``CANCELLED`` like any cancel: nothing is dropped from a queue silently.
"""

from __future__ import annotations

from rq import Queue
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.errors import ApiError
from hive.api.inference import require_admin
from hive.api.state import hive_of
from hive.jobs.service import JobFinished, JobNotFound
from shared import job_record, keys
from shared.spec import JobState

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: Index entries read per round trip while looking for ``limit`` matching jobs.
PAGE = 200
#: What a listing shows of a job's record: not the spec (the prompt) nor the output.
_LISTED_FIELDS = (
    job_record.STATE, job_record.MODEL, job_record.REVISION, job_record.WORKER, job_record.KIND, job_record.OWNER,
    job_record.ATTEMPT, job_record.CREATED_AT, job_record.PICKED_AT, job_record.STARTED_AT, job_record.FINISHED_AT,
    job_record.LOAD_MS, job_record.TTFT_MS, job_record.DECODE_TIME_MS, job_record.PROMPT_TOKENS, job_record.TOKENS_OUT,
    job_record.STOP_REASON, job_record.ERROR_CODE, job_record.ERROR_MESSAGE,
)  # fmt: skip
_STATES = tuple(s.value for s in JobState)


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(422, "INVALID_REQUEST", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _job_summary(job_id: str, record: dict[str, str]) -> dict:
    view = job_record.status_view(job_id, record)
    view.pop("output", None)  # a listing shows no text; GET /v1/inference/<id> does
    view.pop("max_tokens", None)  # in the spec, which a listing does not read
    return view


async def list_jobs(request: Request) -> Response:
    """``GET /v1/jobs?state=&limit=``: the newest jobs first; a key sees its own."""
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    state = request.query_params.get("state") or None
    if state is not None and state not in _STATES:
        raise ApiError(422, "INVALID_REQUEST", f"state must be one of {', '.join(_STATES)}")
    limit = _limit(request)
    index = keys.jobs_index(hive.settings.queue)
    found: list[dict] = []
    start = 0
    while len(found) < limit:
        job_ids = await hive.jobs.redis.zrevrange(index, start, start + PAGE - 1)
        if not job_ids:
            break
        start += PAGE
        async with hive.jobs.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), _LISTED_FIELDS)
            rows = await pipe.execute()
        for job_id, values in zip(job_ids, rows):
            record = {field: value for field, value in zip(_LISTED_FIELDS, values) if value is not None}
            if not record or not principal.may_see(record.get(job_record.OWNER)):
                continue  # expired, or another key's
            if state is None or record.get(job_record.STATE) == state:
                found.append(_job_summary(job_id, record))
                if len(found) == limit:
                    break
    return JSONResponse({"jobs": found})


async def _queues(hive) -> list[dict]:
    """The cluster's shared queue, then the workers' own queues (those RQ knows
    and those of live workers), with their lengths."""
    connection = hive.jobs.redis
    shared = hive.settings.queue
    own_prefix = keys.worker_queue(shared, "")
    names = {
        key.removeprefix(Queue.redis_queue_namespace_prefix)
        for key in await connection.smembers(Queue.redis_queues_keys)
        if key.startswith(Queue.redis_queue_namespace_prefix + own_prefix)
    }
    live = {w["id"] for w in await hive.fleet.workers(with_jobs=False)}
    names |= {keys.worker_queue(shared, w) for w in live}
    ordered = [shared, *sorted(names)]
    async with connection.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.llen(Queue.redis_queue_namespace_prefix + name)
        lengths = await pipe.execute()
    queues = []
    for name, length in zip(ordered, lengths):
        worker = name.removeprefix(own_prefix) if name != shared else None
        queues.append({"name": name, "worker": worker, "worker_alive": worker in live if worker else None, "length": length})
    return queues


async def list_queues(request: Request) -> Response:
    """``GET /v1/queues``: every queue of the cluster and how many jobs wait on each;
    ``waiting`` counts the cluster's waiting jobs in all (as the depth limits do)."""
    hive = hive_of(request)
    hive.auth.authenticate(request)
    waiting = await hive.jobs.redis.zcard(keys.queued(hive.settings.queue))
    # Per API key, by its name (--key-limits) or its id: never the key itself.
    by_key = await hive.jobs.jobs_by_key(hive.auth.owners())
    per_key = [{"key": hive.quotas.name_of(owner), **counts} for owner, counts in by_key.items() if counts["waiting"] or counts["running"]]
    return JSONResponse({"queues": await _queues(hive), "waiting": waiting, "keys": per_key})


async def purge_queue(request: Request) -> Response:
    """``POST /v1/queues/<name>/purge`` (admin): cancels every job waiting on the
    queue, each through the cancel path, so each stream ends with CANCELLED. A job
    a worker took meanwhile is stopped by it (``cancelling``); an RQ job with no
    Hive record, or one already finished, is left where it is (``skipped``)."""
    require_admin(request)
    hive = hive_of(request)
    name = request.path_params["name"]
    if name not in {q["name"] for q in await _queues(hive)}:
        raise ApiError(404, "QUEUE_NOT_FOUND", f"no queue {name} in this cluster (see GET /v1/queues)")
    rq_ids = await hive.jobs.redis.lrange(Queue.redis_queue_namespace_prefix + name, 0, -1)
    outcome: dict[str, list[str]] = {"cancelled": [], "cancelling": [], "skipped": []}
    for rq_id in rq_ids:
        job_id = rq_id.split("-")[0]  # a retry's RQ id is <job id>-<attempt>
        try:
            state = await hive.jobs.cancel(job_id)
        except (JobNotFound, JobFinished):
            outcome["skipped"].append(rq_id)
            continue
        outcome["cancelled" if state == JobState.cancelled.value else "cancelling"].append(job_id)
    return JSONResponse({"queue": name, **outcome})


routes = [
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/queues", list_queues, methods=["GET"]),
    Route("/v1/queues/{name}/purge", purge_queue, methods=["POST"]),
]
