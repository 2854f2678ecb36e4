"""The OpenAPI description of the API, served at ``/openapi.json``.

Built from the same pydantic model that validates requests, so the schema cannot
drift from what the hive accepts. Fuzzers (schemathesis, in the tests) read it.
"""

from __future__ import annotations

from functools import cache

from shared.spec import InferenceRequest, PullRequest

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(ERROR, description)


JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "32 hex characters, as returned by POST /v1/inference",
}


def _openai_operation(own: dict, required: list[str]) -> dict:
    """OpenAI's request shape, as far as Hive reads it (errors in OpenAI's shape too)."""
    common = {
        "model": {"type": "string"},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "seed": {"type": "integer"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    }
    body = {"type": "object", "required": required, "properties": {**common, **own}}
    return {
        "post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": _json({"type": "object"}, "the completion, or with stream: OpenAI's SSE chunks"),
                "400": _json({"type": "object"}, "invalid request"),
                "401": _json({"type": "object"}, "missing or invalid API key"),
                "404": _json({"type": "object"}, "model not found"),
                "429": _json({"type": "object"}, "queue full"),
            },
        }
    }


@cache
def openapi_schema() -> dict:
    request_schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = request_schema.pop("$defs", {})
    components["InferenceRequest"] = request_schema
    components["PullRequest"] = PullRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "array"}},
            }
        },
    }
    components["JobAccepted"] = {
        "type": "object",
        "required": ["job_id", "sse_url", "status_url"],
        "properties": {k: {"type": "string"} for k in ("job_id", "state", "sse_url", "status_url")} | {"position": {"type": "integer"}},
    }
    auth = {"401": _error("missing or invalid API key (when the hive has keys)"), "503": _error("Redis unavailable")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Hive", "version": "0.1.0", "description": "LLM inference jobs streamed over SSE."},
        "paths": {
            "/health": {"get": {"responses": {"200": _json({"type": "object"}, "ok"), "503": _json({"type": "object"}, "Redis unavailable")}}},
            "/v1/inference": {
                "post": {
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}}},
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/JobAccepted"}, "accepted"),
                        "400": _error("not JSON"),
                        "413": _error("body too large"),
                        "422": _error("invalid request, or a webhook the hive will not call (WEBHOOK_ADDRESS_REFUSED, WEBHOOK_UNRESOLVABLE)"),
                        "429": _error("queue full"),
                        **auth,
                    },
                }
            },
            "/v1/inference/{job_id}": {
                "get": {
                    "parameters": [JOB_ID],
                    "responses": {"200": _json({"type": "object"}, "status"), "404": _error("unknown job"), **auth},
                },
                "delete": {
                    "parameters": [JOB_ID],
                    "responses": {
                        "200": _json({"type": "object"}, "cancelled"),
                        "202": _json({"type": "object"}, "cancelling"),
                        "404": _error("unknown job"),
                        "409": _error("already finished"),
                        **auth,
                    },
                },
            },
            "/v1/inference/{job_id}/stream": {
                "get": {
                    "parameters": [
                        JOB_ID,
                        {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                        {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "the job's events", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        "400": _error("bad Last-Event-ID"),
                        "404": _error("unknown job"),
                        **auth,
                    },
                }
            },
            "/v1/chat/completions": _openai_operation(
                {"messages": {"type": "array", "items": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}}},
                ["model", "messages"],
            ),
            "/v1/completions": _openai_operation({"prompt": {"type": "string"}}, ["model", "prompt"]),
            "/v1/workers": {"get": {"responses": {"200": _json({"type": "object"}, "live workers"), **auth}}},
            "/v1/webhooks/default/secret": {
                "get": {
                    "responses": {
                        "200": _json(
                            {"type": "object", "required": ["key"], "properties": {"key": {"type": "string", "pattern": "^whsec_"}}},
                            "the caller's webhook signing secret (Standard Webhooks)",
                        ),
                        **auth,
                    }
                }
            },
            "/v1/jobs": {
                "get": {
                    "parameters": [
                        {"name": "state", "in": "query", "required": False, "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer"}},
                    ],
                    "responses": {"200": _json({"type": "object"}, "the newest jobs"), "422": _error("bad state or limit"), **auth},
                }
            },
            "/v1/queues": {"get": {"responses": {"200": _json({"type": "object"}, "queues and their lengths"), **auth}}},
            "/v1/queues/{name}/purge": {
                "post": {
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json({"type": "object"}, "every waiting job cancelled"),
                        "403": _error("not an admin key"),
                        "404": _error("not this cluster's queue"),
                        **auth,
                    },
                }
            },
            "/v1/models": {"get": {"responses": {"200": _json({"type": "object"}, "models held by workers and the hive"), **auth}}},
            "/v1/models/pull": {
                "post": {
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PullRequest"}}}},
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/JobAccepted"}, "accepted: the stream shows the download"),
                        "400": _error("not JSON"),
                        "403": _error("not an admin key"),
                        "413": _error("body too large"),
                        "422": _error("invalid request"),
                        "429": _error("queue full"),
                        **auth,
                    },
                }
            },
            "/v1/models/{org}/{name}": {
                "delete": {
                    "parameters": [
                        {"name": "org", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "202": _json({"type": "object"}, "the workers holding it in their caches delete it"),
                        "403": _error("not an admin key"),
                        "404": _error("no worker has it"),
                        "409": _error("loaded on a worker"),
                        **auth,
                    },
                }
            },
        },
        "components": {"schemas": components},
    }
