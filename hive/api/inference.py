"""The HTTP endpoints: submit a job, follow its events, read its status, health."""

from __future__ import annotations

import json

from pydantic import ValidationError
from rq import Worker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.admission import admit, answered
from hive.api.auth import Principal
from hive.api.bodies import check_schemas, read_json_body, validation_error
from hive.api.errors import ApiError
from hive.api.openapi import openapi_schema
from hive.api.state import hive_of
from hive.jobs.service import JobFinished, JobNotFound
from hive.streams.sse import SHUTDOWN_GRACE_S, JobEventStream
from shared import job_record, keys
from shared.spec import InferenceRequest, PullRequest

JOB_ID_CHARS = frozenset("0123456789abcdef")


def job_urls(job_id: str, token: str | None = None) -> dict[str, str]:
    sse_url = f"/v1/inference/{job_id}/stream" + (f"?token={token}" if token else "")
    return {"sse_url": sse_url, "status_url": f"/v1/inference/{job_id}"}


async def visible_record(request: Request, job_id: str) -> dict[str, str]:
    """The job's record if the caller may see it; 404 alike for unknown jobs and
    for other keys' jobs, so ids cannot be probed."""
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    record = await hive.jobs.record(job_id)
    if record is None or not principal.may_see(record.get(job_record.OWNER)):
        raise ApiError(404, "JOB_NOT_FOUND", f"no job {job_id} (unknown or expired)")
    return record


def checked_job_id(request: Request) -> str:
    job_id = request.path_params["job_id"]
    if len(job_id) != 32 or not JOB_ID_CHARS.issuperset(job_id):
        raise ApiError(404, "JOB_NOT_FOUND", "no such job")
    return job_id


async def accept_job(request: Request, spec_type: type[InferenceRequest] | type[PullRequest], admin_only: bool = False) -> Response:
    """Validates the body as ``spec_type``, enqueues the job and answers 202 with
    its URLs: the same for inference and pull jobs."""
    hive = hive_of(request)
    principal = require_admin(request) if admin_only else hive.auth.authenticate(request)
    body = await read_json_body(request, hive.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(422, "INVALID_REQUEST", "the body must be a JSON object")
    try:
        spec = spec_type.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e
    if isinstance(spec, InferenceRequest):
        await check_schemas(spec)
    submitted, headers, idempotency_key = await admit(request, spec, body, principal.owner)
    job_id = submitted.job_id
    urls = job_urls(job_id, hive.auth.stream_token(job_id) if hive.auth.enabled else None)
    answer = {"job_id": job_id, "state": "queued", "position": submitted.position, **urls}
    if submitted.replayed:  # the first request's answer, as it was
        answer = json.loads(submitted.response) if submitted.response else answer
    else:
        await answered(request, principal.owner, idempotency_key, answer)
    return JSONResponse(answer, status_code=202, headers={"Location": answer["status_url"], **headers})


async def submit_inference(request: Request) -> Response:
    return await accept_job(request, InferenceRequest)


async def job_status(request: Request) -> Response:
    job_id = checked_job_id(request)
    return JSONResponse(job_record.status_view(job_id, await visible_record(request, job_id)))


async def cancel_job(request: Request) -> Response:
    """Cancels a job in any phase. 200 when it ended at once (it was queued),
    202 while its worker stops it (within a token, a chunk or a layer)."""
    job_id = checked_job_id(request)
    await visible_record(request, job_id)
    try:
        state = await hive_of(request).jobs.cancel(job_id)
    except JobNotFound:
        raise ApiError(404, "JOB_NOT_FOUND", f"no job {job_id} (unknown or expired)") from None
    except JobFinished as e:
        raise ApiError(409, "JOB_FINISHED", f"{e}; nothing to cancel") from None
    return JSONResponse({"job_id": job_id, "state": state}, status_code=200 if state == "cancelled" else 202)


def last_event_id(request: Request) -> int:
    """Where a reconnecting client left off: the ``Last-Event-ID`` header (what
    EventSource sends), or ``?last_event_id=`` for clients that cannot set headers."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
    if not raw.strip().isdigit() or len(raw) > 12:
        raise ApiError(400, "INVALID_LAST_EVENT_ID", "Last-Event-ID must be an event id this stream sent")
    return int(raw)


async def job_stream(request: Request) -> Response:
    job_id = checked_job_id(request)
    hive = hive_of(request)
    after = last_event_id(request)
    token = request.query_params.get("token")
    if token is not None and hive.auth.enabled:
        # The signed token stands for the key that created the job (EventSource sends no headers).
        if not hive.auth.valid_stream_token(job_id, token):
            raise ApiError(401, "INVALID_TOKEN", "the stream token is invalid or expired; ask the status URL with your key")
        record = await hive.jobs.record(job_id)
        if record is None:
            raise ApiError(404, "JOB_NOT_FOUND", f"no job {job_id} (unknown or expired)")
    else:
        record = await visible_record(request, job_id)
    on_abandon = None
    if json.loads(record.get("spec") or "{}").get("cancel_on_disconnect"):
        on_abandon = hive.jobs.cancel
    return JobEventStream(
        hive.relay.follow(job_id, after, on_abandon),
        ping=hive.settings.sse_ping_s,
        # The relay ends every stream with a farewell when this is set; the grace
        # period is how long it has before sse-starlette cancels the stream.
        shutdown_event=hive.relay.stopping,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
        watchdog=hive.stalls,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def health(request: Request) -> Response:
    hive = hive_of(request)
    try:
        await hive.jobs.redis.ping()
        # Workers: the live `hive worker` processes (heartbeats); slots: RQ's
        # workers, one per job a worker can run at once (worker/cluster/rq_slots.py).
        workers = await hive.jobs.redis.zcount(keys.workers(hive.jobs.queue.name), hive.jobs.clock.now() - keys.WORKER_DEAD_AFTER_S, "+inf")
        slots = await run_in_threadpool(Worker.count, queue=hive.jobs.queue)
        depth = await run_in_threadpool(lambda: hive.jobs.queue.count)
    except Exception as e:  # health reports, it does not raise
        return JSONResponse({"status": "unavailable", "redis": f"error: {type(e).__name__}: {e}"}, status_code=503)
    return JSONResponse(
        {"status": "ok", "redis": "ok", "workers": workers, "slots": slots, "queue_depth": depth, "followers": hive.relay.followers}
    )


async def list_workers(request: Request) -> Response:
    """Live workers; their current jobs only for admin keys (and in local mode)."""
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    return JSONResponse({"workers": await hive.fleet.workers(with_jobs=principal.admin)})


async def list_models(request: Request) -> Response:
    """Models held by live workers, in memory or in their hub caches. Shaped as
    OpenAI's model list (``object``/``data``/``id``) with Hive's fields added."""
    hive = hive_of(request)
    hive.auth.authenticate(request)
    models = await hive.fleet.models()
    data = [{"id": m["model"], "object": "model", "owned_by": m["model"].split("/")[0], **m} for m in models]
    return JSONResponse({"object": "list", "data": data})


def require_admin(request: Request) -> Principal:
    principal = hive_of(request).auth.authenticate(request)
    if not principal.admin:
        raise ApiError(403, "FORBIDDEN", "this endpoint needs an admin key (HIVE_ADMIN_KEYS)")
    return principal


async def pull_model(request: Request) -> Response:
    """Downloads a model into a worker's hub cache ahead of its first job; answers
    like an inference job, whose stream shows the download."""
    return await accept_job(request, PullRequest, admin_only=True)


async def delete_model(request: Request) -> Response:
    """Removes a model from the workers' hub caches; 409 while a worker holds it loaded."""
    require_admin(request)
    hive = hive_of(request)
    model = f"{request.path_params['org']}/{request.path_params['name']}"
    known = [m for m in await hive.fleet.models() if m["model"] == model]
    if not known:
        raise ApiError(404, "MODEL_NOT_FOUND", f"no worker has {model} loaded or cached")
    loaded_on = sorted({w for m in known for w in m["loaded_on"]})
    if loaded_on:
        raise ApiError(409, "MODEL_IN_USE", f"{model} is loaded on {', '.join(loaded_on)}; it can be deleted once unloaded (keep_alive)")
    cached_on = sorted({w for m in known for w in m["cached_on"]})
    await hive.fleet.delete_cached(model)
    return JSONResponse({"model": model, "deleting_on": cached_on}, status_code=202)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_schema())


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/v1/inference", submit_inference, methods=["POST"]),
    Route("/v1/inference/{job_id}", job_status, methods=["GET"]),
    Route("/v1/inference/{job_id}", cancel_job, methods=["DELETE"]),
    Route("/v1/inference/{job_id}/stream", job_stream, methods=["GET"]),
    Route("/v1/workers", list_workers, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/pull", pull_model, methods=["POST"]),
    Route("/v1/models/{org}/{name}", delete_model, methods=["DELETE"]),
]
