"""OpenAI-compatible endpoints on top of the same job queue.

``POST /v1/chat/completions`` and ``POST /v1/completions`` turn OpenAI's request
into an ``InferenceRequest``, submit it as ``POST /v1/inference`` does, and turn
the job's events back into OpenAI's shapes: SSE chunks ending with
``data: [DONE]`` (``stream: true``), or one completion once the job has ended.
``GET /v1/models`` is ``hive/api/inference.py``'s, already shaped as OpenAI's list.

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
from dataclasses import dataclass

import anyio
import redis.exceptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.admission import admit, answered
from hive.api.bodies import read_json_body
from hive.api.errors import ApiError
from hive.api.state import Hive, hive_of
from hive.jobs.submit import NotReplicated
from hive.openai.params import ChatParams, CommonParams, CompletionParams, parse
from hive.streams.sse import SHUTDOWN_GRACE_S, JobEventStream
from shared import job_record
from shared.events import DONE_FRAME

log = logging.getLogger("hive.openai")

DONE_LINE = DONE_FRAME.strip()  # b"data: [DONE]"

#: The job's ``end.stop_reason`` as OpenAI's ``finish_reason``; ``cancelled`` is none
#: of OpenAI's: such a job ends the answer with an error.
FINISH_REASONS = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length"}

#: A job's error code as the HTTP status of a non-streamed answer (others: 500).
JOB_ERROR_STATUS = {
    "INVALID_REQUEST": 400,
    "PROMPT_TOO_LONG": 400,
    "MODEL_NOT_SUPPORTED": 400,
    "MODEL_TOO_LARGE": 400,
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


@dataclass(frozen=True)
class Flavour:
    """What tells a chat completion from a text completion in OpenAI's shapes."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish_reason: str | None, chunk: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


CHAT = Flavour("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Flavour("cmpl-", "text_completion", "text_completion", chat=False)


async def usage(hive: Hive, job_id: str) -> dict:
    """The job record's counts, those its status shows."""
    record = await hive.jobs.record(job_id) or {}
    prompt, completion = (int(record.get(k) or 0) for k in (job_record.PROMPT_TOKENS, job_record.TOKENS_OUT))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def job_failure(type_: str, event: dict) -> tuple[str, str] | None:
    """``(code, message)`` when a terminal event is not a finished answer."""
    if type_ == "error":
        return event["code"], event["message"]
    if event["stop_reason"] not in FINISH_REASONS:
        return "CANCELLED", f"the job was cancelled after {event['tokens_out']} tokens"
    return None


async def stream_chunks(hive: Hive, job_id: str, flavour: Flavour, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """The job's tokens as OpenAI's chunks; progress events are left out (the SSE
    pings keep proxies from closing the connection meanwhile). An error is sent as
    OpenAI's error object, which the openai client raises as ``APIError``."""
    head = {"id": flavour.id_prefix + job_id, "object": flavour.chunk_object, "created": int(time.time()), "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list, **fields) -> bytes:
        data = json.dumps({**head, "choices": choices, **extra, **fields}, ensure_ascii=False, separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    def error_chunk(code: str, message: str) -> bytes:
        return f"data: {json.dumps(error_body(JOB_ERROR_STATUS.get(code, 500), code, message))}\n\n".encode()

    role_sent = not flavour.chat
    async for type_, event in job_events(hive, job_id):
        if not role_sent and type_ in ("started", "token", "end"):
            role_sent = True
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        if type_ == "token" and event["t"]:
            yield chunk([flavour.choice(event["t"], None, chunk=True)])
        elif type_ == "gap":
            # OpenAI's chunks have no way to say "text missing here": the stream ends
            # clearly instead of going on with a hole in the text.
            message = f"a Redis failover lost {event['last'] - event['first'] + 1} events of this stream; the whole output is at /v1/inference/{job_id}"
            yield error_chunk("EVENTS_LOST", message)
            break
        elif type_ in ("end", "error"):
            failure = job_failure(type_, event)
            if failure is not None:
                yield error_chunk(*failure)
                continue
            yield chunk([flavour.choice("", FINISH_REASONS[event["stop_reason"]], chunk=True)])
            if include_usage:
                try:
                    yield chunk([], usage=await usage(hive, job_id))
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                    yield error_chunk("REDIS_UNAVAILABLE", f"the usage could not be read: {e}")
    yield DONE_FRAME


async def follow_to_end(request: Request, hive: Hive, job_id: str) -> tuple[str, str, dict] | None:
    """``(text, terminal type, terminal event)``, or None when the client went away
    first: the relay's follower then leaves, which cancels the job."""
    result = None
    async with anyio.create_task_group() as group:

        async def watch_for_disconnect() -> None:
            # The body is read: what comes next from the server is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch_for_disconnect)
        pieces: list[str] = []
        lost = False
        async for type_, event in job_events(hive, job_id):
            if type_ == "token":
                pieces.append(event["t"])
            elif type_ == "gap":
                lost = True
            elif type_ in ("end", "error"):
                text = "".join(pieces)
                if lost:  # tokens lost in a failover: the worker's record has the whole text
                    text = (await hive.jobs.record(job_id) or {}).get(job_record.OUTPUT, text)
                result = (text, type_, event)
        group.cancel_scope.cancel()
    return result


async def answer(request: Request, params_type: type[CommonParams], flavour: Flavour) -> Response:
    """Submits the job, then streams its chunks or waits for its end: both endpoints."""
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    body = await read_json_body(request, hive.settings.max_body_bytes)
    params, spec = parse(body, params_type)
    # A replayed Idempotency-Key follows the first request's job, from its start.
    submitted, admit_headers, idempotency_key = await admit(request, spec, body, principal.owner, openai=True)
    job_id = submitted.job_id
    if not submitted.replayed:
        await answered(request, principal.owner, idempotency_key, {"job_id": job_id})
    headers = {"X-Hive-Job-Id": job_id, **admit_headers}
    if params.stream:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        return JobEventStream(
            stream_chunks(hive, job_id, flavour, params.model, include_usage),
            ping=hive.settings.sse_ping_s,
            shutdown_event=hive.relay.stopping,
            shutdown_grace_period=SHUTDOWN_GRACE_S,
            watchdog=hive.stalls,
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    created = int(time.time())
    result = await follow_to_end(request, hive, job_id)
    if result is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    text, type_, event = result
    failure = job_failure(type_, event)
    if failure is not None:
        code, message = failure
        status = JOB_ERROR_STATUS.get(code, 500)
        if code in NOT_RETRIED:
            headers["X-Should-Retry"] = "false"
        return JSONResponse(error_body(status, code, message), status, headers=headers)
    completion = {
        "id": flavour.id_prefix + job_id,
        "object": flavour.object,
        "created": created,
        "model": params.model,
        "choices": [flavour.choice(text, FINISH_REASONS[event["stop_reason"]], chunk=False)],
        "usage": await usage(hive, job_id),
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
