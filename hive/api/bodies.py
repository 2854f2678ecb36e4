"""Reading a request's body: JSON, bounded before it is read, pydantic's refusals as
the API shows them, and the JSON Schemas a job holds (tools, response_format),
checked before anything is queued: one the grammar engine cannot enforce is a 400
naming the keyword, never a job that fails later or an answer that ignores it.
Shared by the job API and the OpenAI routes."""

from __future__ import annotations

import json

import anyio
from pydantic import ValidationError
from starlette.requests import Request

from hive.api.errors import ApiError
from shared.json_grammar import UnsupportedSchema, check_schema
from shared.spec import InferenceRequest


async def read_json_body(request: Request, limit: int) -> object:
    """The body parsed as JSON, refusing more than ``limit`` bytes before reading them."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "BODY_TOO_LARGE", f"request bodies are limited to {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"request bodies are limited to {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "INVALID_JSON", f"the body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ApiError(400, "INVALID_JSON", "the body's JSON is nested too deeply") from e


def validation_error(e: ValidationError) -> ApiError:
    details = [
        {"field": ".".join(str(p) for p in err["loc"]) or None, "message": err["msg"]}
        for err in e.errors(include_url=False, include_input=False)
    ]
    summary = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details)
    return ApiError(422, "INVALID_REQUEST", summary, details)


def _schemas(spec: InferenceRequest) -> list[tuple[dict | None, bool, str]]:
    """``(schema, strict, field)`` for each schema the job's grammar will hold."""
    checks = []
    if spec.response_format is not None and spec.response_format.type == "json_schema":
        # A response format asks for JSON matching its schema: always enforced in full.
        checks.append((spec.response_format.json_schema.json_schema, True, "response_format.json_schema.schema"))
    if spec.tool_mode != "none":
        for k, tool in enumerate(spec.tools):
            checks.append((tool.function.parameters, bool(tool.function.strict), f"tools.{k}.function.parameters"))
    return checks


def _check_all(checks: list[tuple[dict | None, bool, str]]) -> None:
    for schema, strict, field in checks:
        try:
            check_schema(schema, strict, field)
        except UnsupportedSchema as e:
            raise ApiError(400, e.code, str(e), [{"field": field, "message": str(e)}]) from None


async def check_schemas(spec: InferenceRequest) -> None:
    """Raises ApiError (400 ``UNSUPPORTED_SCHEMA``) for the first schema that cannot be
    enforced. On a thread: fifty tools' schemas take ~90 ms to check on this project's
    CPU, time the event loop, which relays every stream, must not lose."""
    checks = _schemas(spec)
    if checks:
        await anyio.to_thread.run_sync(_check_all, checks)
