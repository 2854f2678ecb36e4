"""``POST /v1/embeddings``, OpenAI's shape, as a job of its own kind.

The request becomes an ``EmbeddingRequest`` (shared/spec.py), admitted and routed as
an inference job is (to a worker warm with the model when there is one); the worker
pools the model's hidden states into one vector per input (worker/model/embedder.py)
and leaves them under ``keys.job_embeddings`` (base64 of little-endian float32)
just before the job's ``end``. This route waits for that end, as a non-streamed
completion does (the job is cancelled if the client goes away first), then answers
the vectors as JSON numbers or, with ``encoding_format: "base64"``, as OpenAI's
base64 of float32.

Token ids as input (OpenAI accepts them) are refused: the worker would have to
trust ids made by another tokenizer. LangChain's ``OpenAIEmbeddings`` sends them
unless it is made with ``check_embedding_ctx_length=False``; the 400 says so.
"""

from __future__ import annotations

import array
import base64
import json
import sys

import anyio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.admission import admit, answered
from hive.api.bodies import read_json_body, validation_error
from hive.api.errors import ApiError
from hive.api.state import Hive, hive_of
from hive.openai.routes import JOB_ERROR_STATUS, NOT_RETRIED, error_body, follow_to_end, openai_errors
from shared import job_record, keys
from shared.spec import EmbeddingRequest

#: The ``end.stop_reason`` of an embedding job that answered.
EMBEDDED = "embedded"
#: A job's error code as the answer's HTTP status: the completions' table, and the
#: refusal of a model Hive cannot embed with as it declares (a Dense layer, …).
ERROR_STATUS = {**JOB_ERROR_STATUS, "UNSUPPORTED_MODEL": 400, "EMBEDDINGS_EXPIRED": 410}
#: The body fields the job takes; other OpenAI fields (``user``) are ignored.
FIELDS = tuple(EmbeddingRequest.model_fields)

TOKEN_IDS_MESSAGE = (
    "input: token ids are not supported, send the texts. LangChain's OpenAIEmbeddings sends token ids "
    "unless it is created with check_embedding_ctx_length=False"
)


def is_token_ids(value: object) -> bool:
    """OpenAI's other input forms: one id, a list of ids, a list of lists of ids."""
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, list) and any(isinstance(v, list) or (isinstance(v, int) and not isinstance(v, bool)) for v in value)


def parse(body: object) -> EmbeddingRequest:
    """OpenAI's request as the job it asks for; ApiError (400 once answered) when Hive cannot honour it."""
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_REQUEST", "the body must be a JSON object")
    if is_token_ids(body.get("input")):
        raise ApiError(400, "UNSUPPORTED_PARAMETER", TOKEN_IDS_MESSAGE, [{"field": "input", "message": TOKEN_IDS_MESSAGE}])
    # A null is "not given", as OpenAI's own clients send it.
    fields = {name: body[name] for name in FIELDS if body.get(name) is not None}
    try:
        return EmbeddingRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from e


def render(spec: EmbeddingRequest, vectors: bytes, dim: int, prompt_tokens: int) -> bytes:
    """OpenAI's list of embeddings. Floats are written with 9 significant digits,
    which give back the very float32 (Python's repr of it as a double takes 17)."""
    row_bytes = 4 * dim
    count = len(vectors) // row_bytes
    values = None
    if spec.encoding_format == "float":
        values = array.array("f", vectors)
        if sys.byteorder == "big":
            values.byteswap()
    rows = []
    for i in range(count):
        if values is None:
            embedding = '"' + base64.b64encode(vectors[i * row_bytes : (i + 1) * row_bytes]).decode() + '"'
        else:
            embedding = "[" + ",".join(f"{x:.9g}" for x in values[i * dim : (i + 1) * dim]) + "]"
        rows.append(f'{{"object":"embedding","index":{i},"embedding":{embedding}}}')
    usage = json.dumps({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens})
    return f'{{"object":"list","data":[{",".join(rows)}],"model":{json.dumps(spec.model)},"usage":{usage}}}'.encode()


async def wait_for_end(request: Request, hive: Hive, job_id: str) -> tuple[str, dict] | None:
    """The job's terminal event ``(type, fields)``, or None when the client went away
    first: the relay's follower then leaves, which cancels the job."""
    choices = await follow_to_end(request, hive, [job_id])
    return None if choices is None else choices[0].end


async def stored_vectors(hive: Hive, job_id: str) -> tuple[bytes | None, int, int]:
    """``(vectors, dim, prompt tokens)`` as the worker left them; vectors None once expired."""
    async with hive.jobs.redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.job(job_id), job_record.EMBEDDING_DIM, job_record.PROMPT_TOKENS)
        pipe.get(keys.job_embeddings(job_id))
        (dim, prompt_tokens), encoded = await pipe.execute()
    vectors = base64.b64decode(encoded) if encoded is not None else None
    return vectors, int(dim or 0), int(prompt_tokens or 0)


@openai_errors
async def embeddings(request: Request) -> Response:
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    body = await read_json_body(request, hive.settings.max_body_bytes)
    spec = parse(body)
    # A replayed Idempotency-Key follows the first request's job, from its start.
    submitted, admit_headers, idempotency_key = await admit(request, spec, body, principal.owner, openai=True)
    job_id = submitted.job_id
    if not submitted.replayed:
        await answered(request, principal.owner, idempotency_key, {"job_id": job_id})
    headers = {"X-Hive-Job-Id": job_id, **admit_headers}
    result = await wait_for_end(request, hive, job_id)
    if result is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    type_, event = result
    if type_ == "error":
        code, message = event["code"], event["message"]
    elif event["stop_reason"] != EMBEDDED:
        code, message = "CANCELLED", "the job was cancelled"
    else:
        vectors, dim, prompt_tokens = await stored_vectors(hive, job_id)
        if vectors is not None and dim:
            content = await anyio.to_thread.run_sync(render, spec, vectors, dim, prompt_tokens)
            return Response(content, media_type="application/json", headers=headers)
        code = "EMBEDDINGS_EXPIRED"
        message = f"the vectors of job {job_id} are kept {keys.EMBEDDINGS_TTL_S // 60} minutes after its end; send the request again without its Idempotency-Key"
    status = ERROR_STATUS.get(code, 500)
    if code in NOT_RETRIED:
        headers["X-Should-Retry"] = "false"
    return JSONResponse(error_body(status, code, message), status, headers=headers)


routes = [Route("/v1/embeddings", embeddings, methods=["POST"])]
