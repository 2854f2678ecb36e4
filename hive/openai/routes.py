"""OpenAI-compatible endpoints on top of the same job queue.

``POST /v1/chat/completions`` and ``POST /v1/completions`` turn OpenAI's request
into an ``InferenceRequest``, submit it as ``POST /v1/inference`` does, and turn
the job's events back into OpenAI's shapes: SSE chunks ending with
``data: [DONE]`` (``stream: true``), or one completion once the job has ended.
``GET /v1/models`` is ``hive/api/inference.py``'s, already shaped as OpenAI's list.
``n`` choices are ``n`` jobs, submitted together: they share the worker's batch, and
their events merge into one stream, each chunk naming its choice's index.

An OpenAI client cannot resume a stream, so these jobs are submitted with
``cancel_on_disconnect``: a client that goes away, streaming or not, cancels its job.
The job id is the completion's id after its prefix (``chatcmpl-<job_id>``) and the
``X-Hive-Job-Id`` header, so ``/v1/inference/<job_id>`` shows its status.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import redis.exceptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.admission import admit, answered
from hive.api.bodies import check_schemas, read_json_body
from hive.api.errors import ApiError
from hive.api.state import Hive, hive_of
from hive.jobs.service import JobFinished, JobNotFound
from hive.jobs.submit import NotReplicated
from hive.openai.params import ChatParams, CommonParams, CompletionParams, parse
from hive.openai.shapes import CHAT, FINISH_REASONS, TEXT, Choice, Flavour, chunk_choice, final_chunk_choice, role_chunk_choice
from hive.streams.sse import SHUTDOWN_GRACE_S, JobEventStream
from shared import job_record
from shared.events import DONE_FRAME
from shared.spec import InferenceRequest

log = logging.getLogger("hive.openai")

DONE_LINE = DONE_FRAME.strip()  # b"data: [DONE]"

#: A job's error code as the HTTP status of a non-streamed answer (others: 500).
JOB_ERROR_STATUS = {
    "INVALID_REQUEST": 400,
    "PROMPT_TOO_LONG": 400,
    "MODEL_NOT_SUPPORTED": 400,
    "MODEL_TOO_LARGE": 400,
    "UNSUPPORTED_SCHEMA": 400,
    "TOOLS_NOT_SUPPORTED": 400,
    "MODEL_NOT_FOUND": 404,
    "CANCELLED": 409,
    "DOWNLOAD_FAILED": 502,
    "EVENTS_LOST": 503,
    "REDIS_UNAVAILABLE": 503,
    "SHUTTING_DOWN": 503,
    "WORKER_LOST": 503,
    "TIMEOUT": 504,
}
#: Errors the openai client must not retry by itself (it retries 409 and 5xx):
#: a retry would undo a cancel, or run an hour-long job again.
NOT_RETRIED = frozenset({"CANCELLED", "TIMEOUT"})


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


def error_body(status: int, code: str, message: str, param: str | None = None, details: list | None = None) -> dict:
    """OpenAI's error object, which holds Hive's (``code``, ``message``, ``details``) too."""
    body = {"message": message, "type": error_type(status), "param": param, "code": code}
    return {"error": {**body, "details": details} if details else body}


def openai_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answers the endpoint's errors as OpenAI does, so that its clients raise their
    own exceptions: the class comes from the status, hence 400 (not Hive's 422)
    for invalid fields, and ``param`` names the first of them."""

    @functools.wraps(endpoint)
    async def answer_as_openai(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as e:
            # 422 stays for an Idempotency-Key reused with another request (the IETF draft's).
            status = 400 if e.status == 422 and e.code != "IDEMPOTENCY_KEY_REUSED" else e.status
            param = e.details[0].get("field") if e.details else None
            return JSONResponse(error_body(status, e.code, e.message, param, e.details), status, headers=e.headers)
        except NotReplicated as e:
            log.warning("%s %s: %s", request.method, request.url.path, e)
            return JSONResponse(error_body(503, "REDIS_UNAVAILABLE", f"{e}; retry shortly"), 503, headers={"Retry-After": str(e.retry_after_s)})
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.warning("redis unavailable during %s %s: %s", request.method, request.url.path, e)
            message = "the queue backend (Redis) is unavailable; retry shortly"
            return JSONResponse(error_body(503, "REDIS_UNAVAILABLE", message), 503, headers={"Retry-After": "2"})

    return answer_as_openai


async def job_events(hive: Hive, job_id: str) -> AsyncIterator[tuple[str, dict]]:
    """The job's events as ``(type, fields)`` until its stream ends (``end``, ``error``,
    or an id-less ``error`` that ends the stream only). The relay's chunks hold one
    or more ``shared.events.sse_frame``s, each with one ``data:`` line holding the
    JSON. The job is cancelled when its last follower leaves before the end."""
    async with contextlib.aclosing(hive.relay.follow(job_id, 0, hive.jobs.cancel)) as chunks:
        async for chunk in chunks:  # one or more frames
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: ") and line != DONE_LINE:
                    event = json.loads(line[6:])
                    yield event["event"], event


async def usage(hive: Hive, job_ids: list[str]) -> dict:
    """The job records' counts, those their status shows, summed over the choices
    (the prompt counts once: its jobs share it; so do its cached tokens, the
    fewest any choice found in the worker's prefix cache)."""
    prompt = completion = 0
    cached: list[int] = []
    for job_id in job_ids:
        record = await hive.jobs.record(job_id) or {}
        prompt = int(record.get(job_record.PROMPT_TOKENS) or 0)
        completion += int(record.get(job_record.TOKENS_OUT) or 0)
        cached.append(int(record.get(job_record.CACHED_TOKENS) or 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(cached, default=0)},
    }


def job_failure(type_: str, event: dict) -> tuple[str, str] | None:
    """``(code, message)`` when a terminal event is not a finished answer."""
    if type_ == "error":
        return event["code"], event["message"]
    if event["stop_reason"] not in FINISH_REASONS:
        return "CANCELLED", f"the job was cancelled after {event['tokens_out']} tokens"
    return None


async def choice_events(hive: Hive, job_ids: list[str]) -> AsyncIterator[tuple[int, str, dict]]:
    """Every choice's events as ``(index, type, fields)``, merged as they come."""
    if len(job_ids) == 1:
        async for type_, event in job_events(hive, job_ids[0]):
            yield 0, type_, event
        return
    send, receive = anyio.create_memory_object_stream[tuple[int, str, dict]](64)
    async with anyio.create_task_group() as group:

        async def follow(index: int, job_id: str, send) -> None:
            async with send:
                async for type_, event in job_events(hive, job_id):
                    await send.send((index, type_, event))

        async with send:
            for index, job_id in enumerate(job_ids):
                group.start_soon(follow, index, job_id, send.clone())
        async with receive:
            async for item in receive:
                yield item


async def stream_chunks(hive: Hive, job_ids: list[str], flavour: Flavour, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """The jobs' tokens and tool calls as OpenAI's chunks; progress events are left
    out (the SSE pings keep proxies from closing the connection meanwhile). An error
    is sent as OpenAI's error object, which the openai client raises as ``APIError``."""
    head = {"id": flavour.id_prefix + job_ids[0], "object": flavour.chunk_object, "created": int(time.time()), "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list, **fields) -> bytes:
        data = json.dumps({**head, "choices": choices, **extra, **fields}, ensure_ascii=False, separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    def error_chunk(code: str, message: str) -> bytes:
        return f"data: {json.dumps(error_body(JOB_ERROR_STATUS.get(code, 500), code, message))}\n\n".encode()

    role_sent = [not flavour.chat] * len(job_ids)
    offsets = [0] * len(job_ids)
    ended = 0
    async with contextlib.aclosing(choice_events(hive, job_ids)) as events:
        async for index, type_, event in events:
            if not role_sent[index] and type_ in ("started", "token", "tool_call", "end"):
                role_sent[index] = True
                yield chunk([role_chunk_choice(index)])
            if type_ in ("token", "tool_call"):
                choice = chunk_choice(flavour, index, type_, event, offsets[index])
                if type_ == "token":
                    offsets[index] += len(event["t"])
                if choice is not None:
                    yield chunk([choice])
            elif type_ == "gap":
                # OpenAI's chunks have no way to say "text missing here": the stream ends
                # clearly instead of going on with a hole in the text.
                job_id = job_ids[index]
                message = f"a Redis failover lost {event['last'] - event['first'] + 1} events of this stream; the whole output is at /v1/inference/{job_id}"
                yield error_chunk("EVENTS_LOST", message)
                break
            elif type_ in ("end", "error"):
                failure = job_failure(type_, event)
                if failure is not None:
                    yield error_chunk(*failure)
                    continue
                yield chunk([final_chunk_choice(flavour, index, event["stop_reason"])])
                ended += 1
                if include_usage and ended == len(job_ids):
                    try:
                        yield chunk([], usage=await usage(hive, job_ids))
                    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                        yield error_chunk("REDIS_UNAVAILABLE", f"the usage could not be read: {e}")
    yield DONE_FRAME


async def follow_to_end(request: Request, hive: Hive, job_ids: list[str]) -> list[Choice] | None:
    """Each job's answer once all have ended, or None when the client went away
    first: the relay's followers then leave, which cancels the jobs."""
    choices = [Choice(index, job_id) for index, job_id in enumerate(job_ids)]
    finished = False
    async with anyio.create_task_group() as group:

        async def watch_for_disconnect() -> None:
            # The body is read: what comes next from the server is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch_for_disconnect)
        async with contextlib.aclosing(choice_events(hive, job_ids)) as events:
            async for index, type_, event in events:
                choices[index].add(type_, event)
        for choice in choices:
            if choice.lost:  # tokens lost in a failover: the worker's record has the whole answer
                record = await hive.jobs.record(choice.job_id) or {}
                choice.pieces = [record.get(job_record.OUTPUT, choice.text)]
                if record.get(job_record.TOOL_CALLS):
                    choice.tool_calls = json.loads(record[job_record.TOOL_CALLS])
        finished = all(choice.end is not None for choice in choices)
        group.cancel_scope.cancel()
    return choices if finished else None


async def submit_choices(request: Request, spec: InferenceRequest, n: int, body: object, owner: str) -> tuple[list[str], dict]:
    """The ``n`` jobs of one request: ``(job ids, the answer's headers)``. Each choice
    samples on its own generator: with a ``seed``, choice k uses ``seed + k``."""
    hive = hive_of(request)
    job_ids, headers = [], {}
    for k in range(n):
        choice_spec = spec if k == 0 or spec.seed is None else spec.model_copy(update={"seed": (spec.seed + k) % 2**63})
        try:
            # A replayed Idempotency-Key follows the first request's jobs, from their start.
            submitted, admit_headers, idempotency_key = await admit(request, choice_spec, body, owner, openai=True, choice=k)
        except ApiError:
            # Choice k was refused (429: the queue or the key's limit): the answer is that
            # refusal, so the choices already queued would run for nobody.
            for job_id in job_ids:
                with contextlib.suppress(JobNotFound, JobFinished):
                    await hive.jobs.cancel(job_id)
            raise
        if not submitted.replayed:
            await answered(request, owner, idempotency_key, {"job_id": submitted.job_id})
        job_ids.append(submitted.job_id)
        headers = headers or admit_headers
    return job_ids, {"X-Hive-Job-Id": ",".join(job_ids), **headers}


def event_stream(hive: Hive, frames: AsyncIterator[bytes], headers: dict) -> JobEventStream:
    """The SSE answer that sends ``frames``, with the hive's pings, shutdown and stall watchdog."""
    return JobEventStream(
        frames,
        ping=hive.settings.sse_ping_s,
        shutdown_event=hive.relay.stopping,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
        watchdog=hive.stalls,
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def failure_response(choices: list[Choice], headers: dict) -> JSONResponse | None:
    """The first failed choice's error as OpenAI's error answer; None when every job finished."""
    for choice in choices:
        failure = job_failure(*choice.end)
        if failure is not None:
            code, message = failure
            status = JOB_ERROR_STATUS.get(code, 500)
            if code in NOT_RETRIED:
                headers["X-Should-Retry"] = "false"
            return JSONResponse(error_body(status, code, message), status, headers=headers)
    return None


async def answer(request: Request, params_type: type[CommonParams], flavour: Flavour) -> Response:
    """Submits the jobs, then streams their chunks or waits for their ends: both endpoints."""
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    body = await read_json_body(request, hive.settings.max_body_bytes)
    params, spec = parse(body, params_type)
    await check_schemas(spec)
    job_ids, headers = await submit_choices(request, spec, params.n or 1, body, principal.owner)
    if params.stream:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        return event_stream(hive, stream_chunks(hive, job_ids, flavour, params.model, include_usage), headers)
    created = int(time.time())
    choices = await follow_to_end(request, hive, job_ids)
    if choices is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    failed = failure_response(choices, headers)
    if failed is not None:
        return failed
    completion = {
        "id": flavour.id_prefix + job_ids[0],
        "object": flavour.object,
        "created": created,
        "model": params.model,
        "choices": [choice.as_openai(flavour) for choice in choices],
        "usage": await usage(hive, job_ids),
    }
    return JSONResponse(completion, headers=headers)


@openai_errors
async def chat_completions(request: Request) -> Response:
    return await answer(request, ChatParams, CHAT)


@openai_errors
async def completions(request: Request) -> Response:
    return await answer(request, CompletionParams, TEXT)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
