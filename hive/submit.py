"""Submitting a job: one Lua script, one round trip, from the event loop.

The script checks the depth limits, claims a warm worker and writes the job
record, the first event (``queued``), the jobs index, the waiting sets and RQ's
own job hash and queue entry: a job is either wholly accepted or not at all, and
the hive holds nothing of it (any hive process serves any request).

Routing: each worker listens to its own RQ queue, then to the cluster's shared
one. A job whose model an idle worker already holds goes to that worker's own
queue (the worker is claimed from the model's idle set with ZPOPMAX, so two jobs
never pick the same idle worker); any other job goes to the shared queue, where
the first free worker takes it. The reaper hands on what a claim stranded
(hive/jobs.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import uuid
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from shared import events, jobs, keys
from shared.clock import RedisClock
from shared.events import Queued
from shared.settings import Settings
from shared.spec import InferenceRequest, JobState, PullRequest

from .quotas import KeyLimits

log = logging.getLogger("hive.submit")


class QueueFull(Exception):
    """Too many jobs waiting, in all or for this model: come back later."""

    retry_after_s = 5


@dataclass(frozen=True)
class Admission:
    """What a submit brings besides the job: its key's limits, and its
    Idempotency-Key (hashed) with the hash of the request it came with."""

    limits: KeyLimits = KeyLimits()
    idempotency_key: str = ""
    request_hash: str = ""


@dataclass(frozen=True)
class Submitted:
    job_id: str
    position: int
    #: The key's rate tokens left (when it has a rate) and its jobs in flight.
    tokens_left: float = 0.0
    in_flight: int = 0
    #: An Idempotency-Key replay: the first request's stored response ("" if none).
    replayed: bool = False
    response: str = ""


class KeyLimited(Exception):
    """The key is past one of its limits (hive/quotas.py): nothing was written."""

    def __init__(self, code: str, message: str, retry_after_s: float, in_flight: int, tokens_left: float = 0.0):
        super().__init__(message)
        self.code, self.retry_after_s, self.in_flight, self.tokens_left = code, retry_after_s, in_flight, tokens_left


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used with another request (``in_admission`` False), or
    its first request is still being admitted (True): come back shortly."""

    def __init__(self, job_id: str, in_admission: bool):
        super().__init__(job_id)
        self.job_id, self.in_admission = job_id, in_admission


class NotReplicated(Exception):
    """The job did not reach enough replicas in time (``--redis-min-replicas``): it
    was withdrawn, so nothing of it stays behind. Come back shortly."""

    retry_after_s = 2


#: Retry-After for a key at its jobs-in-flight limit: when one of them ends is unknown.
CONCURRENCY_RETRY_S = 1.0

#: How long a submit waits for replicas to acknowledge it (Redis's WAIT).
REPLICA_WAIT_MS = 1000


# Submits a job in one step: the depth checks, the claim of a warm worker, and
# every write (job record, first event, jobs index, waiting sets, RQ's job and its
# queue), so a job is either wholly accepted or not at all, in one round trip.
#
# The pick, capacity-aware: of the model's idle set (workers holding the model with
# a free slot, most recently freed first, the first ARGV[6]), the live one (a
# heartbeat since ARGV[4]) with the most free slots: its capacity less its running
# jobs (its hash, ARGV[5] .. name) less its claims (ARGV[21] .. name: jobs routed
# to it that it has not yet counted as running, so neither a worker listed for two
# models nor one taking a job off its queue right now is given more than it has
# slots); the pick adds a claim.
# Dead or full entries are dropped on the way, and a worker whose last slot this
# job takes; the worker lists itself again when a slot frees. The picked worker
# gets the job on its own RQ queue (ARGV[10] .. name) and the job waits behind no
# one; a job left on a full or dead worker's queue is handed on by the reaper.
#
# The keys of a worker's own queue and of RQ's job are built here from prefixes
# (which worker is claimed is only known here): one Redis, not a cluster.
# Per-key limits and the Idempotency-Key come as ARGV[23], a JSON object (Admission),
# with their keys: KEYS[10] the key's jobs in flight, KEYS[11] its rate bucket,
# KEYS[12] the idempotency record; fair share's are KEYS[13] (the waiting jobs by
# tag) and KEYS[14] (each key's youngest waiting job).
# Returns {0, position, worker or "", rate tokens left, jobs in flight}, or
# {1, waiting} / {2, waiting for the model} when a depth limit is reached,
# {3, in flight} / {4, seconds until a token, in flight} when the key's limits are,
# {5, job id, stored response} replaying an Idempotency-Key, {6, job id} when it was
# used with another request, {7, job id} when that request is still in admission.
_SUBMIT = """
local ROUND, IN_FLIGHT_SCAN = 1000000, 16
local control = cjson.decode(ARGV[23])
local now = tonumber(ARGV[3])
-- Idempotency-Key: the same key and body answer the same job (its stored response),
-- a different body is refused, and a request still in admission asks to come back.
if control.idem ~= '' then
  local held = redis.call('HMGET', KEYS[12], 'hash', 'job_id', 'state', 'response')
  if held[2] then
    if held[1] ~= control.idem then return {6, held[2]} end
    if held[3] ~= 'accepted' then return {7, held[2]} end
    return {5, held[2], held[4] or ''}
  end
end
-- Per-key limits, checked before anything is written: jobs in flight (the set drops
-- the jobs that ended as it counts), then the create rate (a token bucket).
-- The scan is bounded, so a key with thousands of jobs waiting does not make every
-- submit of it read them all: the oldest (most likely running or ended) are read,
-- as many as the limit needs, or IN_FLIGHT_SCAN for a key without one.
local in_flight, running = 0, 0
local scan = IN_FLIGHT_SCAN
if control.max_in_flight > 0 then scan = control.max_in_flight + IN_FLIGHT_SCAN end
for _, id in ipairs(redis.call('ZRANGE', KEYS[10], 0, scan - 1)) do
  local state = redis.call('HGET', control.job_prefix .. id, 'state')
  if not state or state == 'completed' or state == 'failed' or state == 'cancelled' then
    redis.call('ZREM', KEYS[10], id)
  elseif state ~= 'queued' then
    running = running + 1
  end
end
in_flight = redis.call('ZCARD', KEYS[10])
if control.max_in_flight > 0 and in_flight >= control.max_in_flight then return {3, in_flight} end
local tokens = 0
if control.rate > 0 then
  local bucket = redis.call('HMGET', KEYS[11], 'tokens', 'at')
  local at = tonumber(bucket[2]) or now
  tokens = math.min(control.burst, (tonumber(bucket[1]) or control.burst) + math.max(0, now - at) * control.rate)
  if tokens < 1 then return {4, tostring((1 - tokens) / control.rate), in_flight} end
end
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[1]) then return {1, waiting} end
local for_model = redis.call('ZCARD', KEYS[2])
if for_model >= tonumber(ARGV[2]) then return {2, for_model} end
local worker = ''
if ARGV[12] == '1' then
  local best = -1
  for _, name in ipairs(redis.call('ZREVRANGE', KEYS[3], 0, ARGV[6] - 1)) do
    local beat = redis.call('ZSCORE', KEYS[4], name)
    local free = -1
    if beat and tonumber(beat) >= tonumber(ARGV[4]) then
      local slots = redis.call('HMGET', ARGV[5] .. name, 'capacity', 'running')
      local claimed = math.max(tonumber(redis.call('GET', ARGV[21] .. name) or '0'), 0)
      free = (tonumber(slots[1]) or 1) - (tonumber(slots[2]) or 0) - claimed
    end
    if free <= 0 then
      redis.call('ZREM', KEYS[3], name)  -- dead or full: it lists itself again when a slot frees
    elseif free > best then
      worker, best = name, free
    end
  end
  if best == 1 then redis.call('ZREM', KEYS[3], worker) end  -- its last free slot
  if worker ~= '' then
    redis.call('INCR', ARGV[21] .. worker)
    redis.call('PEXPIRE', ARGV[21] .. worker, ARGV[22])
  end
end
local rq_queue, position = ARGV[9], waiting + 1
if worker ~= '' then rq_queue, position = ARGV[10] .. worker, 1 end
local ttl, job_id = ARGV[7], ARGV[8]  -- ARGV[3] as sent for the scores
if worker ~= '' then
  redis.call('RPUSH', ARGV[11] .. rq_queue, job_id)
else
  -- Fair share: start-time fair queueing by API key. A job's round is the round of
  -- the job first in line, or one past its key's youngest job still waiting, if
  -- later; within a round, the key with fewer running jobs first, then arrival.
  -- One key's jobs keep their order; another key's job joins the current round.
  local round = 0
  local head = redis.call('ZRANGE', KEYS[13], 0, 0, 'WITHSCORES')
  if #head > 0 then round = math.floor(tonumber(head[2]) / ROUND) end
  local youngest = redis.call('HGET', KEYS[14], control.owner)
  if youngest then
    local last_round, last_job = string.match(youngest, '^(%d+):(.+)$')
    if redis.call('ZSCORE', KEYS[13], last_job) then round = math.max(round, tonumber(last_round) + 1) end
  end
  local arrival = redis.call('INCR', KEYS[13] .. ':arrivals') % 1000
  redis.call('EXPIRE', KEYS[13] .. ':arrivals', ttl)
  local score = round * ROUND + math.min(running, 999) * 1000 + arrival
  redis.call('ZADD', KEYS[13], score, job_id)
  redis.call('EXPIRE', KEYS[13], ttl)
  redis.call('HSET', KEYS[14], control.owner, round .. ':' .. job_id)
  redis.call('EXPIRE', KEYS[14], ttl)
  -- The RQ list follows that order: the job goes in before the first one behind it.
  local placed = false
  for _, next_id in ipairs(redis.call('ZRANGE', KEYS[13], '(' .. score, '+inf', 'BYSCORE', 'LIMIT', 0, 16)) do
    if redis.call('LINSERT', ARGV[11] .. rq_queue, 'BEFORE', next_id, job_id) > 0 then
      placed = true
      break
    end
  end
  if not placed then redis.call('RPUSH', ARGV[11] .. rq_queue, job_id) end
  position = redis.call('ZRANK', KEYS[13], job_id) + 1
end
-- The job's record (ARGV[19]) and RQ's hash (ARGV[20]) come as JSON objects of
-- strings, RQ's binary fields as pairs after them: a few long arguments cost the
-- hive far less to send than fifty short ones.
local function flat(object, into)
  for field, value in pairs(cjson.decode(object)) do
    into[#into + 1] = field
    into[#into + 1] = value
  end
  return into
end
local record = flat(ARGV[19], {ARGV[15], rq_queue, ARGV[16], position})
local rq_fields = flat(ARGV[20], {'origin', rq_queue, unpack(ARGV, 24, #ARGV)})
redis.call('HSET', KEYS[5], unpack(record))
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('XADD', KEYS[6], ARGV[17], 'e', ARGV[18], 'd', ARGV[13] .. position .. ARGV[14])
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - tonumber(ttl))
redis.call('ZADD', KEYS[7], ARGV[3], job_id)
redis.call('EXPIRE', KEYS[7], ttl)
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[3], job_id)
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('HSET', KEYS[8], unpack(rq_fields))
redis.call('SADD', KEYS[9], ARGV[11] .. rq_queue)
redis.call('ZADD', KEYS[10], ARGV[3], job_id)
redis.call('EXPIRE', KEYS[10], ttl)
if control.rate > 0 then
  tokens = tokens - 1
  redis.call('HSET', KEYS[11], 'tokens', tostring(tokens), 'at', ARGV[3])
  redis.call('EXPIRE', KEYS[11], math.ceil(control.burst / control.rate) + 60)
end
if control.idem ~= '' then
  redis.call('HSET', KEYS[12], 'hash', control.idem, 'job_id', job_id, 'state', control.idem_state)
  redis.call('EXPIRE', KEYS[12], control.idem_ttl)
end
return {0, position, worker, tostring(tokens), in_flight + 1}
"""

# Takes back a submit that did not reach enough replicas: everything the submit
# script wrote, unless a worker has already taken the job off its RQ queue (then it
# runs, and stays accepted). KEYS as _SUBMIT's 1, 2, 5, 6, 7, 8; ARGV: the job id,
# the RQ queue's key, the claims key of the worker it was routed to (or "").
_WITHDRAW = """
if redis.call('LREM', ARGV[2], 0, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[6])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[3] ~= '' and tonumber(redis.call('GET', ARGV[3]) or '0') > 0 then redis.call('DECR', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('DEL', ARGV[4]) end
redis.call('ZREM', ARGV[5], ARGV[1])
redis.call('ZREM', ARGV[6], ARGV[1])
return 1
"""

#: How many of a model's listed workers a submit looks at to pick one.
PICK_CANDIDATES = 16

#: The `queued` event's JSON around its position, which only the submit script knows.
_QUEUED_HEAD, _QUEUED_TAIL = Queued(-1).to_json().split("-1")


class Submitter:
    def __init__(self, settings: Settings, connection: aioredis.Redis, sync_connection: redis.Redis, clock: RedisClock):
        """``sync_connection``: only for RQ's ``Job.create``, which wants one and
        sends nothing. ``clock``: the submit time and the workers' liveness cut-off,
        on the clock their heartbeats are on."""
        self.settings = settings
        self.clock = clock
        self._sync_connection = sync_connection
        self._redis = connection
        self._submit = connection.register_script(_SUBMIT)
        self._withdraw = connection.register_script(_WITHDRAW)

    async def submit(self, request: InferenceRequest | PullRequest, owner: str, admission: Admission = Admission()) -> Submitted:
        """Submits the job; a PullRequest downloads the model only. Raises QueueFull,
        KeyLimited, IdempotencyConflict or NotReplicated when it is not accepted.

        One round trip (the submit script); the hive holds nothing of the job."""
        job_id = uuid.uuid4().hex
        kind = "pull" if isinstance(request, PullRequest) else "inference"
        queue, model = self.settings.queue, request.model
        now = self.clock.now()
        record = {
            jobs.SPEC: request.model_dump_json(),
            jobs.STATE: JobState.queued.value,
            jobs.MODEL: model,
            jobs.REVISION: request.revision or "",
            jobs.CREATED_AT: str(now),
            jobs.ATTEMPT: "1",
            jobs.RQ_ID: job_id,
            jobs.QUEUE: queue,
            jobs.KIND: kind,
            jobs.OWNER: owner,
        }
        rq_job = self._rq_job_fields(job_id, job_id, request.model_dump(mode="json"), kind)
        script_keys = [
            keys.queued(queue),
            keys.queued_for_model(queue, model),
            keys.idle_with(queue, model, request.revision),
            keys.workers(queue),
            keys.job(job_id),
            keys.job_events(job_id),
            keys.jobs_index(queue),
            Job.key_for(job_id),
            Queue.redis_queues_keys,
            keys.key_in_flight(owner),
            keys.key_rate(owner),
            keys.idempotency(owner, admission.idempotency_key or "-"),
            keys.fair(queue),
            keys.fair_tags(queue),
        ]
        limits = admission.limits
        control = {
            "max_in_flight": limits.max_in_flight,
            "rate": limits.rate_per_min / 60,
            "burst": limits.burst,
            "job_prefix": keys.job(""),
            "idem": admission.request_hash if admission.idempotency_key else "",
            "idem_state": "admitting",
            "idem_ttl": keys.ADMISSION_TTL_S,
            "owner": owner,
        }
        script_args = [
            self.settings.max_queue,
            self.settings.max_queue_per_model,
            now,
            now - keys.WORKER_DEAD_AFTER_S,
            keys.worker(""),
            PICK_CANDIDATES,
            self.settings.job_ttl_s,
            job_id,
            queue,
            keys.worker_queue(queue, ""),
            Queue.redis_queue_namespace_prefix,
            int(kind == "inference"),  # pulls go to any worker: the shared queue
            _QUEUED_HEAD,
            _QUEUED_TAIL,
            jobs.RQ_QUEUE,
            jobs.POSITION,
            events.stream_id(1),
            Queued.type,
            json.dumps(record),
            # str first: RQ's JobStatus is a str enum, whose str() is its name.
            json.dumps({k: v if isinstance(v, str) else str(v) for k, v in rq_job.items() if not isinstance(v, bytes)}),
            keys.worker_claims(""),
            keys.CLAIM_TTL_MS,
            json.dumps(control),
            *itertools.chain.from_iterable((k, v) for k, v in rq_job.items() if isinstance(v, bytes)),
        ]
        replicas = self.settings.redis_min_replicas
        if replicas:
            outcome = await self._submit_replicated(job_id, script_keys, script_args, replicas, bool(admission.idempotency_key))
        else:
            outcome = await self._run_submit(self._redis, script_keys, script_args)
        outcome = [v.decode() if isinstance(v, bytes) else v for v in outcome]
        code, count = outcome[0], outcome[1]
        # Checked against the waiting sets as they are: a soft bound on memory and
        # waiting time, not a quota (jobs already taken by workers do not count).
        if code == 1:
            raise QueueFull(f"{count} jobs are waiting (the limit is {self.settings.max_queue})")
        if code == 2:
            raise QueueFull(f"{count} jobs for {model} are waiting (the limit is {self.settings.max_queue_per_model})")
        if code == 3:
            message = f"this API key has {count} jobs in flight, its limit; retry once one ends"
            raise KeyLimited("CONCURRENCY_LIMIT", message, CONCURRENCY_RETRY_S, count)
        if code == 4:
            wait_s = float(count)
            message = f"this API key may create {limits.rate_per_min:g} jobs a minute; retry in {wait_s:.1f} s"
            raise KeyLimited("RATE_LIMITED", message, wait_s, int(outcome[2]))
        if code == 5:
            return Submitted(count, 0, replayed=True, response=outcome[2])
        if code in (6, 7):
            raise IdempotencyConflict(count, in_admission=code == 7)
        return Submitted(job_id, count, float(outcome[3]), int(outcome[4]))

    async def accepted(self, owner: str, idempotency_key: str, response: str) -> None:
        """The answer to an Idempotency-Key's request is out: replays get it (24 h)."""
        record = keys.idempotency(owner, idempotency_key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping={"state": "accepted", "response": response})
            pipe.expire(record, keys.IDEMPOTENCY_TTL_S)
            await pipe.execute()

    async def _run_submit(self, client: aioredis.Redis, script_keys: list, script_args: list) -> list:
        # A master short of replicas refuses the script's first write (NOREPLICAS,
        # raised as shared.connections.WritesRefused): nothing of the job is written.
        return await self._submit(keys=script_keys, args=script_args, client=client)

    async def _submit_replicated(self, job_id: str, script_keys: list, script_args: list, replicas: int, idempotent: bool) -> list:
        """The submit, then WAIT for ``replicas`` replicas to have it, on the same
        connection (WAIT counts that connection's writes). Short of them, the job is
        withdrawn and NotReplicated raised: a 202 promises the job survives the
        master's loss, within the limits Redis's replication gives (asynchronous:
        WAIT makes the loss unlikely, not impossible)."""
        async with self._redis.client() as connection:
            outcome = await self._run_submit(connection, script_keys, script_args)
            if outcome[0] != 0:
                return outcome  # refused: nothing was written
            try:
                acknowledged = await connection.wait(replicas, REPLICA_WAIT_MS)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                acknowledged = -1  # unknown: take it back if the master still answers
            if acknowledged >= replicas:
                return outcome
        worker = outcome[2]
        worker = worker.decode() if isinstance(worker, bytes) else worker
        queue = self.settings.queue
        rq_queue = Queue.redis_queue_namespace_prefix + (keys.worker_queue(queue, worker) if worker else queue)
        try:
            withdrawn = await self._withdraw(
                keys=[script_keys[i] for i in (0, 1, 4, 5, 6, 7)],
                args=[
                    job_id, rq_queue, keys.worker_claims(worker) if worker else "", script_keys[11] if idempotent else "",
                    script_keys[9], script_keys[12],
                ],
            )
        except redis.exceptions.RedisError as e:  # the master is going: the 503 still tells the truth
            log.warning("job %s: could not withdraw a submit short of replicas: %s", job_id, e)
            raise NotReplicated(f"the job may not have reached the {replicas} Redis replicas it needs: {e}") from e
        if not withdrawn:
            return outcome  # a worker took it meanwhile: it runs, so it stays accepted
        have = "unknown" if acknowledged < 0 else str(acknowledged)
        raise NotReplicated(f"the job reached {have} of the {replicas} Redis replicas it needs within {REPLICA_WAIT_MS} ms")

    def _rq_job_fields(self, job_id: str, rq_id: str, spec: dict, kind: str) -> dict:
        """RQ's own hash of the job, as ``Queue.enqueue_call`` writes it, built by RQ
        (``Job.to_dict``) without its round trips; the script adds ``origin``."""
        job = Job.create(
            jobs.TASKS[kind],
            args=(job_id, spec),
            id=rq_id,
            connection=self._sync_connection,
            serializer=JSONSerializer,
            timeout=self.settings.job_timeout_s,
            result_ttl=0,
            failure_ttl=self.settings.job_ttl_s,
            status=JobStatus.QUEUED,
        )
        job.enqueued_at = rq_now()
        fields = job.to_dict()
        fields.pop("origin", None)
        return fields
