"""The job record: a Redis hash the hive creates and the worker updates.

Field names live here once; ``status_view`` turns the hash into the
``GET /v1/inference/<id>`` JSON.
"""

from __future__ import annotations

import json

from .spec import JobState

#: The worker function RQ runs for an inference job, by dotted name: the hive
#: enqueues it without importing the worker package (torch).
RUN_INFERENCE = "worker.tasks.run_inference"
RUN_PULL = "worker.tasks.run_pull"
RUN_EMBEDDING = "worker.tasks.run_embedding"
#: Job kinds (the record's KIND) and the worker function that runs each.
TASKS = {"inference": RUN_INFERENCE, "pull": RUN_PULL, "embedding": RUN_EMBEDDING}

#: A job whose worker is lost before its first token runs once more, on another worker.
MAX_ATTEMPTS = 2

# Hash fields. Numbers are stored as decimal strings, times as Unix seconds.
SPEC = "spec"
STATE = "state"
MODEL = "model"
REVISION = "revision"
WORKER = "worker"
CREATED_AT = "created_at"
PICKED_AT = "picked_at"
STARTED_AT = "started_at"
FINISHED_AT = "finished_at"
LOAD_MS = "load_ms"
TTFT_MS = "ttft_ms"
DECODE_TIME_MS = "decode_time_ms"
TOKENS_OUT = "tokens_out"
STOP_REASON = "stop_reason"
KIND = "kind"  # inference, pull or embedding
OWNER = "owner"  # a digest of the API key that created the job, never the key
ATTEMPT = "attempt"  # 1, then 2 when retried after a lost worker
RQ_ID = "rq_id"  # the RQ job carrying the current attempt
QUEUE = "queue"  # the cluster's queue (a retry goes back to it; depth limits count on it)
RQ_QUEUE = "rq_queue"  # the RQ queue holding the current attempt: QUEUE, or a warm worker's own
POSITION = "position"  # the last queue position its stream was told
OUTPUT = "output"
#: The answer's tool calls, as OpenAI's JSON list ``[{id, type, function: {name, arguments}}]``.
TOOL_CALLS = "tool_calls"
PROMPT_TOKENS = "prompt_tokens"
#: The prompt's prefix hashes (shared/prefix_affinity.py), comma-separated: the
#: worker that takes the job off the shared queue becomes their affinity.
PREFIXES = "prefixes"
CACHED_TOKENS = "cached_tokens"  # of the prompt, found in the worker's prefix cache
#: An embedding job's vector size; the vectors are under keys.job_embeddings (shorter-lived).
EMBEDDING_DIM = "embedding_dim"
ERROR_CODE = "error_code"
ERROR_MESSAGE = "error_message"
# The terminal webhook delivery, as the status shows it (hive/webhooks/delivery.py writes them).
WEBHOOK_STATE = "webhook_state"  # pending (or none yet), delivering, delivered, failed
WEBHOOK_ATTEMPTS = "webhook_attempts"
WEBHOOK_STATUS = "webhook_status"  # the last attempt's HTTP status
WEBHOOK_ERROR = "webhook_error"  # why the last attempt failed, when it did


def _num(value: str | None) -> float | int | None:
    if value is None or value == "":
        return None
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number


def status_view(job_id: str, record: dict[str, str]) -> dict:
    """The public status of a job from its hash (already decoded to str)."""
    state = record.get(STATE, JobState.queued.value)
    created, picked, started, finished = (
        _num(record.get(k)) for k in (CREATED_AT, PICKED_AT, STARTED_AT, FINISHED_AT)
    )
    spec = json.loads(record.get(SPEC) or "{}")
    view: dict = {
        "job_id": job_id,
        "kind": record.get(KIND) or "inference",
        "state": state,
        "model": record.get(MODEL),
        "revision": record.get(REVISION) or None,
        "worker": record.get(WORKER) or None,
        "created_at": created,
        "picked_at": picked,
        "started_at": started,
        "finished_at": finished,
        "timings": {
            "queue_ms": round((picked - created) * 1000, 1) if picked and created else None,
            "load_ms": _num(record.get(LOAD_MS)),
            "ttft_ms": _num(record.get(TTFT_MS)),
            "decode_time_ms": _num(record.get(DECODE_TIME_MS)),
            "total_ms": round((finished - created) * 1000, 1) if finished and created else None,
        },
        "prompt_tokens": _num(record.get(PROMPT_TOKENS)),
        "cached_tokens": _num(record.get(CACHED_TOKENS)),
        "tokens_out": _num(record.get(TOKENS_OUT)),
        "stop_reason": record.get(STOP_REASON) or None,
        "max_tokens": spec.get("max_tokens"),
        "attempt": _num(record.get(ATTEMPT)) or 1,
    }
    if state == JobState.completed.value or OUTPUT in record:
        view["output"] = record.get(OUTPUT, "")  # partial when cancelled mid-generation
    if record.get(TOOL_CALLS):
        view["tool_calls"] = json.loads(record[TOOL_CALLS])
    if record.get(ERROR_CODE):
        view["error"] = {"code": record.get(ERROR_CODE), "message": record.get(ERROR_MESSAGE)}
    if spec.get("webhook"):
        view["webhook"] = webhook_view(spec, record)
    return view


def webhook_view(spec: dict, record: dict[str, str]) -> dict:
    """The webhook's part of the status: the events asked for and, when the job's
    end is one of them, that delivery's state (pending until its first attempt)."""
    events = spec.get("webhook_events_filter") or ["completed"]
    wants_end = "completed" in events
    return {
        "events_filter": events,
        "state": (record.get(WEBHOOK_STATE) or "pending") if wants_end else None,
        "attempts": _num(record.get(WEBHOOK_ATTEMPTS)) or 0,
        "last_status": _num(record.get(WEBHOOK_STATUS)),
        "last_error": record.get(WEBHOOK_ERROR) or None,
    }
