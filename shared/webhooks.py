"""Webhook deliveries as the job's writers enqueue them, hive and worker alike.

A job's webhook is called when it starts, while it writes output, and when it ends.
Whoever writes the state that starts or ends a job (the worker's reporter, or the
hive when it ends a job itself: a cancel while queued, a lost worker, a queue-wait
TIMEOUT) adds ``enqueue`` to the same pipeline as that write, so no terminal state
goes without its delivery, whichever process wrote it, and even while no hive
runs. The hives deliver from Redis (hive/webhooks/delivery.py).
"""

from __future__ import annotations

from . import job_record, keys

START = "start"
OUTPUT = "output"
COMPLETED = "completed"  # every final state: completed, failed, cancelled

# Enqueues the delivery of ``event`` if the job's spec asks for it. The spec (its
# webhook and filter) and the job's queue are read here, from the record, so the
# writers need not know them. A delivery already enqueued is left alone: a retried
# job starts twice (the lease decides which of a worker and a reaper ends a job:
# worker/cluster/reporter.py). ``start`` also puts the job on the output watch when
# the filter asks for output; the end takes it off. A Lua function, so that the
# worker's script that ends a job enqueues in the same call.
# Arguments: the job's record, the delivery's hash, event, now, TTL, the due set's
# and the output watch's key prefixes (the queue is appended), job id, the record's
# spec and queue field names.
ENQUEUE_FUNCTION = """
local function enqueue_webhook(record, delivery, event, now, ttl, due_prefix, output_prefix, job_id, spec_field, queue_field)
  local spec = redis.call('HGET', record, spec_field)
  if not spec then return 0 end
  local ok, decoded = pcall(cjson.decode, spec)
  if not ok or type(decoded) ~= 'table' or type(decoded['webhook']) ~= 'string' then return 0 end
  local queue = redis.call('HGET', record, queue_field) or ''
  local filter = decoded['webhook_events_filter']
  if type(filter) ~= 'table' then filter = {'completed'} end
  local wants = {}
  for _, name in ipairs(filter) do wants[name] = true end
  if event == 'start' then
    if wants['output'] then redis.call('ZADD', output_prefix .. queue, 'NX', now, job_id) end
  else
    redis.call('ZREM', output_prefix .. queue, job_id)
  end
  if not wants[event] then return 0 end
  if redis.call('HSETNX', delivery, 'event', event) == 0 then return 0 end
  redis.call('EXPIRE', delivery, ttl)
  redis.call('ZADD', due_prefix .. queue, now, job_id .. ':' .. event)
  return 1
end
"""
_ENQUEUE = ENQUEUE_FUNCTION + "return enqueue_webhook(KEYS[1], KEYS[2], unpack(ARGV))"


def enqueue_arguments(job_id: str, event: str, now: float, ttl_s: int) -> tuple[list[str], list]:
    """``enqueue_webhook``'s keys (the record, the delivery) and its other arguments."""
    keys_ = [keys.job(job_id), keys.webhook_delivery(job_id, event)]
    return keys_, [event, now, ttl_s, keys.webhooks_due(""), keys.webhooks_output(""), job_id, job_record.SPEC, job_record.QUEUE]


def enqueue(pipe, job_id: str, event: str, now: float, ttl_s: int) -> None:
    """Adds the enqueue of ``event``'s delivery (START or COMPLETED) to ``pipe``, a
    redis-py pipeline that writes the job's new state: put it after that write."""
    keys_, args = enqueue_arguments(job_id, event, now, ttl_s)
    pipe.register_script(_ENQUEUE)(keys=keys_, args=args)


def member(job_id: str, event: str) -> str:
    """A delivery's member in the due set."""
    return f"{job_id}:{event}"


def parse_member(value: str) -> tuple[str, str]:
    job_id, _, event = value.rpartition(":")
    return job_id, event


def message_id(job_id: str, event: str, seq: int | None = None) -> str:
    """The ``webhook-id``: the same on every attempt of one delivery, so a receiver
    can drop duplicates; each output delivery has its own (``seq``: its last event)."""
    return f"msg_{job_id}_{event}" + (f"_{seq}" if seq is not None else "")
