"""Reading a request's body: JSON, bounded before it is read, and pydantic's refusals
as the API shows them. Shared by the job API and the OpenAI routes."""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.requests import Request

from hive.api.errors import ApiError


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
