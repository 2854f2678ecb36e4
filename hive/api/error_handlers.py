"""How failures are answered over HTTP: one handler per exception, every answer
``{"error": {"code", "message"}}`` with a 4xx/5xx.

The only place that maps failures to HTTP status codes; imported by hive/app.py alone,
because it must know every domain exception (jobs', webhooks', Redis's).
"""

from __future__ import annotations

import logging

import redis.exceptions
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from hive.api.errors import ApiError, error_response
from hive.jobs.submit import NotReplicated
from hive.webhooks.guard import WebhookRefused
from shared.connections import WritesRefused

log = logging.getLogger("hive.errors")


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "BAD_REQUEST", 413: "BODY_TOO_LARGE"}


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "REDIS_UNAVAILABLE", "the queue backend (Redis) is unavailable; retry shortly", headers={"Retry-After": "2"})


async def writes_refused(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis refuses writes during %s %s: %s", request.method, request.url.path, exc)
    message = f"Redis refuses writes for now, for want of replicas ({exc}); nothing was accepted, retry shortly"
    return error_response(503, "REDIS_UNAVAILABLE", message, headers={"Retry-After": "2"})


async def not_replicated(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotReplicated)
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "REDIS_UNAVAILABLE", f"{exc}; nothing was accepted, retry shortly", headers={"Retry-After": str(exc.retry_after_s)})


async def webhook_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WebhookRefused)
    details = [{"field": "webhook", "message": str(exc)}]
    return error_response(422, exc.code, str(exc), details)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after answering, and uvicorn logs the traceback.
    return error_response(500, "INTERNAL", "internal error; see the hive's log")


EXCEPTION_HANDLERS = {
    ApiError: api_error,
    HTTPException: http_error,
    redis.exceptions.ConnectionError: redis_down,
    redis.exceptions.TimeoutError: redis_down,
    NotReplicated: not_replicated,
    WritesRefused: writes_refused,
    WebhookRefused: webhook_refused,
    Exception: internal_error,
}
