"""Checking a job's JSON Schemas at submit, before anything is queued: a schema the
grammar engine cannot enforce is a 400 naming the keyword, never a job that
fails later (or, worse, an answer that ignores it)."""

from __future__ import annotations

import anyio

from hive.api.errors import ApiError
from shared.json_grammar import UnsupportedSchema, check_schema
from shared.spec import InferenceRequest


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
