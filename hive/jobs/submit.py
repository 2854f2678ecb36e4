"""Submitting a job: one Lua script, one round trip, from the event loop.

The script (hive/jobs/submit_script.py) answers an Idempotency-Key's replay, checks the
API key's limits and the depth limits, claims a warm worker, places the job in the
shared queue's fair-share order, and writes the job record, the first event
(``queued``), the jobs index, the waiting sets and RQ's own job hash and queue
entry: a job is either wholly accepted or not at all, and the hive holds nothing of
it (any hive process serves any request). With ``--redis-min-replicas`` the submit
waits for replicas to have it, or is taken back.

Routing: each worker listens to its own RQ queue, then to the cluster's shared
one. A job whose model an idle worker already holds goes to that worker's own
queue (the worker is claimed from the model's idle set with ZPOPMAX, so two jobs
never pick the same idle worker); any other job goes to the shared queue, where
the first free worker takes it. The reaper hands on what a claim stranded
(hive/jobs/service.py).
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

from hive.jobs.quotas import KeyLimits
from hive.jobs.submit_script import SUBMIT, WITHDRAW
from shared import events, job_record, keys
from shared.clock import RedisClock
from shared.events import Queued
from shared.prefix_affinity import AFFINITY_TTL_S, prefix_hashes
from shared.settings import Settings
from shared.spec import EmbeddingRequest, InferenceRequest, JobState, PullRequest

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
    """The key is past one of its limits (hive/jobs/quotas.py): nothing was written."""

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
        self._submit = connection.register_script(SUBMIT)
        self._withdraw = connection.register_script(WITHDRAW)

    async def enqueue(
        self, request: InferenceRequest | PullRequest | EmbeddingRequest, owner: str, admission: Admission = Admission()
    ) -> Submitted:
        """Submits the job; a PullRequest downloads the model only, an EmbeddingRequest
        runs the model's forward once per batch of inputs (no decoding). Raises QueueFull,
        KeyLimited, IdempotencyConflict or NotReplicated when it is not accepted.

        One round trip (the submit script); the hive holds nothing of the job."""
        job_id = uuid.uuid4().hex
        kind = "pull" if isinstance(request, PullRequest) else "embedding" if isinstance(request, EmbeddingRequest) else "inference"
        queue, model = self.settings.queue, request.model
        now = self.clock.now()
        prefixes = prefix_hashes(request, owner) if kind == "inference" and self.settings.prefix_routing else []
        record = {
            job_record.SPEC: request.model_dump_json(),
            job_record.STATE: JobState.queued.value,
            job_record.MODEL: model,
            job_record.REVISION: request.revision or "",
            job_record.CREATED_AT: str(now),
            job_record.ATTEMPT: "1",
            job_record.RQ_ID: job_id,
            job_record.QUEUE: queue,
            job_record.KIND: kind,
            job_record.OWNER: owner,
            job_record.PREFIXES: ",".join(prefixes),
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
            "prefix": [keys.prefix_affinity(queue, h) for h in prefixes],
            "affinity_ttl": AFFINITY_TTL_S,
            "spread_key": keys.prefix_spread(queue),
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
            int(kind != "pull"),  # to a worker warm with the model; pulls go to any worker: the shared queue
            _QUEUED_HEAD,
            _QUEUED_TAIL,
            job_record.RQ_QUEUE,
            job_record.POSITION,
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
            job_record.TASKS[kind],
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
