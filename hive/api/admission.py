"""Admitting a job over HTTP: the ``Idempotency-Key`` header, the key's limits, and
how a refusal is answered. Shared by ``POST /v1/inference`` and the OpenAI routes.

Idempotency follows the IETF draft (draft-ietf-httpapi-idempotency-key-header): a key
is scoped to the API key that sent it, is at most 255 characters and is remembered
24 h. The same key with the same request answers the first request's job (its very
response on ``/v1/inference``), with ``Idempotent-Replayed: true``, even while the job
runs; with another request, 422 ``IDEMPOTENCY_KEY_REUSED``; while its first request is
still being admitted, 409 ``IDEMPOTENCY_KEY_IN_USE`` with ``Retry-After``. A request
refused before its job was written (a 4xx, a 429) leaves nothing behind, so its retry
can succeed. All of it is decided in the submit script, atomically with the submit:
ten concurrent POSTs with one key make one job.
"""

from __future__ import annotations

import hashlib
import json
import math

from starlette.requests import Request

from hive.api.errors import ApiError
from hive.api.state import hive_of
from hive.jobs.quotas import rate_limit_headers
from hive.jobs.submit import Admission, IdempotencyConflict, KeyLimited, QueueFull, Submitted
from shared.spec import EmbeddingRequest, InferenceRequest, PullRequest

MAX_KEY_CHARS = 255


def _idempotency_key(request: Request, choice: int = 0) -> str:
    """The header's key, hashed (it is stored nowhere as sent), or "". Choice k > 0
    of an OpenAI request with ``n`` choices (each a job) gets a key of its own."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return ""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':  # the draft's sf-string form
        value = value[1:-1]
    if not value or len(value) > MAX_KEY_CHARS:
        raise ApiError(400, "INVALID_IDEMPOTENCY_KEY", f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters")
    return hashlib.sha256((value if not choice else f"{value}\n{choice}").encode()).hexdigest()


def _request_hash(request: Request, body: object) -> str:
    """What makes two requests "the same": the route and the JSON body, whatever its
    key order or spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{request.url.path}\n{canonical}".encode()).hexdigest()


async def admit(
    request: Request, spec: InferenceRequest | PullRequest | EmbeddingRequest, body: object, owner: str, openai: bool = False,
    choice: int = 0,
) -> tuple[Submitted, dict[str, str], str]:
    """Submits the job: ``(submitted, headers for the answer, idempotency key hash or "")``.
    Raises ApiError for a refusal, with its headers."""
    hive = hive_of(request)
    key = _idempotency_key(request, choice)
    limits = hive.quotas.for_owner(owner)
    admission = Admission(limits, key, _request_hash(request, body) if key else "")
    try:
        submitted = await hive.jobs.submit(spec, owner, admission)
    except QueueFull as e:
        raise ApiError(429, "QUEUE_FULL", f"{e}; retry later", headers={"Retry-After": str(e.retry_after_s)}) from None
    except KeyLimited as e:
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}
        headers |= rate_limit_headers(limits, e.tokens_left, e.retry_after_s, e.in_flight, openai)
        raise ApiError(429, e.code, str(e), headers=headers) from None
    except IdempotencyConflict as e:
        if e.in_admission:
            message = "a request with this Idempotency-Key is still being admitted; retry shortly"
            raise ApiError(409, "IDEMPOTENCY_KEY_IN_USE", message, headers={"Retry-After": "1"}) from None
        message = f"this Idempotency-Key was used with another request (job {e.job_id}); use a new key for a new request"
        raise ApiError(422, "IDEMPOTENCY_KEY_REUSED", message) from None
    if submitted.replayed:
        return submitted, {"Idempotent-Replayed": "true"}, key
    headers = {}
    if limits.limited:
        refill_s = (limits.burst - submitted.tokens_left) / (limits.rate_per_min / 60) if limits.rate_per_min else 0.0
        headers = rate_limit_headers(limits, submitted.tokens_left, refill_s, submitted.in_flight, openai)
    return submitted, headers, key


async def answered(request: Request, owner: str, key: str, response: object) -> None:
    """Remembers the answer to an Idempotency-Key's first request, for its replays."""
    if key:
        await hive_of(request).jobs.idempotency_answered(owner, key, json.dumps(response))
