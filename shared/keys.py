"""Every Redis key and channel Hive uses, built in one place behind one prefix.

RQ keeps its own keys under ``rq:``; only the queue *names* are ours.
"""

from __future__ import annotations

PREFIX = "hive"

#: Job records and replay logs live this long after their last write (seconds).
JOB_TTL_S = 24 * 3600

#: The RQ queue the hive enqueues inference jobs on and workers listen to.
DEFAULT_QUEUE = f"{PREFIX}:inference"


def job(job_id: str) -> str:
    """Hash: the job's spec, state, timings and final output (TTL: JOB_TTL_S)."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Stream: the job's replay log, entry ids ``<seq>-0`` (TTL: JOB_TTL_S)."""
    return f"{PREFIX}:job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    """String: set when the job is to be cancelled; a worker checks it when it takes the job (TTL: JOB_TTL_S)."""
    return f"{PREFIX}:job:{job_id}:cancel"


#: Pub/sub channel carrying the ids of jobs to cancel, for the workers running them.
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def queued(queue: str) -> str:
    """Sorted set: the jobs waiting on RQ queue ``queue``, scored by submit time
    (queue-depth limits, queue-wait timeouts). Refreshed with JOB_TTL_S."""
    return f"{PREFIX}:queued:{queue}"


def queued_for_model(queue: str, model: str) -> str:
    """Sorted set: the same, for one model (the per-model depth limit)."""
    return f"{PREFIX}:queued:{queue}:{model}"


def jobs_index(queue: str) -> str:
    """Sorted set: every job submitted to ``queue``, scored by submit time, for
    listing jobs (``GET /v1/jobs``). Each submit drops the entries older than
    the job TTL and refreshes the key's TTL, so it expires like the jobs it lists."""
    return f"{PREFIX}:jobs:{queue}"


#: Sorted set of running jobs, scored by the time their worker's lease runs out.
#: Workers renew the lease every LEASE_RENEW_S; a hive that finds a lease older than
#: LEASE_S treats the worker as lost. Emptied as jobs end (and refreshed with JOB_TTL_S).
#: Every time in Hive's keys is on Redis's clock (shared/clock.py), whichever host wrote it.
RUNNING = f"{PREFIX}:running"
LEASE_S = 5.0
LEASE_RENEW_S = 1.0


def lease_deadline(now: float) -> float:
    """The score of a lease granted or renewed at ``now`` (Redis's clock)."""
    return now + LEASE_S


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying each event the moment it is appended to the log."""
    return f"{PREFIX}:job:{job_id}:live"


def relay_channel() -> str:
    """Pub/sub channel the hive's relay always holds, so its connection stays subscribed."""
    return f"{PREFIX}:relay"


# Fleet: where workers are, what they hold, and how jobs find a warm one.

#: Workers heartbeat this often; a worker silent for WORKER_DEAD_AFTER_S is dead.
HEARTBEAT_S = 1.0
WORKER_DEAD_AFTER_S = 3 * HEARTBEAT_S


def workers(queue: str) -> str:
    """Sorted set: the workers serving ``queue``, scored by their last heartbeat
    (Unix seconds, Redis's clock); the hive drops those silent for WORKER_DEAD_AFTER_S."""
    return f"{PREFIX}:workers:{queue}"


def worker(name: str) -> str:
    """Hash: a worker's device, memory, models held, state, capacity (slots) and
    running jobs (TTL: WORKER_DEAD_AFTER_S, renewed by each heartbeat)."""
    return f"{PREFIX}:worker:{name}"


def worker_queue(queue: str, name: str) -> str:
    """The RQ queue of one worker: the hive routes a job here when that worker has
    a free slot and already holds the job's model. Workers listen to it before ``queue``."""
    return f"{queue}:w:{name}"


def worker_claims(name: str) -> str:
    """Counter: jobs the hive routed to a worker's own queue that the worker has not
    yet counted as running (the submit script adds one; the worker takes one off
    as it counts the job running, in one MULTI; the reaper, for each job it hands
    on). The script appends the name to ``worker_claims("")``."""
    return f"{PREFIX}:claims:{name}"


#: How long claims hold if their jobs never reach the worker (a worker that died).
CLAIM_TTL_MS = 30_000

#: An RQ job id that never exists (an item of a worker's own queue, not a key). A
#: host cut off from Redis cannot close its connections, so its free slots' BLPOPs
#: stay waiting in Redis, which would hand them the next jobs; the reaper releases
#: them by pushing this id (hive/jobs/stranded.py). A slot that gets it (its link back)
#: finds no such job, and RQ waits on its queues again.
NO_JOB = f"{PREFIX}-no-job"


def popped(queue: str) -> str:
    """Sorted set: jobs of ``queue`` still waiting by their record but on no RQ
    queue when a worker was found dead (RQ's pop took them and no worker took them
    on), scored by when that was seen; the reaper puts back those still so a moment
    later. Refreshed with JOB_TTL_S; emptied as they are looked at."""
    return f"{PREFIX}:popped:{queue}"


def idle_with(queue: str, model: str, revision: str | None) -> str:
    """Sorted set: the workers of ``queue`` with a free slot that hold ``model`` at
    ``revision``, scored by when a slot last freed. The submit script picks one
    whose slots are not all taken (running plus its claims) and drops
    full ones; a worker adds itself again when a job gives its slot back."""
    return f"{PREFIX}:idle:{queue}:{model}@{revision or 'main'}"


def prefix_affinity(queue: str, prefix_hash: str) -> str:
    """STRING: the worker of ``queue`` that last ran a job whose prompt starts with
    the prefix hashed to ``prefix_hash`` (shared/prefix_affinity.py), with a TTL."""
    return f"{PREFIX}:prefix:{queue}:{prefix_hash}"


def prefix_spread(queue: str) -> str:
    """STRING, a counter: which of the equally loaded workers a prompt whose prefix
    no worker holds goes to (in turn)."""
    return f"{PREFIX}:prefix-spread:{queue}"


#: Pub/sub channel carrying the ids of models to delete from the workers' caches.
MODEL_DELETE_CHANNEL = f"{PREFIX}:models:delete"


#: Written (and expiring at once) to learn whether Redis takes writes again after an
#: outage: a PING is answered while a new master still refuses writes (NOREPLICAS).
WRITE_PROBE = f"{PREFIX}:write-probe"
WRITE_PROBE_TTL_MS = 1000


def key_in_flight(owner: str) -> str:
    """Sorted set: an API key's jobs in flight (queued or running), by submit time.
    Self-cleaning: the submit script drops the jobs that ended as it counts them
    (hive/jobs/submit.py), so nothing else has to remember to."""
    return f"{PREFIX}:key:{owner}:in-flight"


def key_rate(owner: str) -> str:
    """Hash: an API key's create-rate token bucket (``tokens``, ``at``)."""
    return f"{PREFIX}:key:{owner}:rate"


def idempotency(owner: str, key_hash: str) -> str:
    """Hash: what an ``Idempotency-Key`` of one API key (its SHA-256) answered:
    ``hash`` (of the request), ``job_id``, ``state`` (admitting | accepted), ``response``."""
    return f"{PREFIX}:key:{owner}:idem:{key_hash}"


#: An Idempotency-Key is remembered this long after its first use.
IDEMPOTENCY_TTL_S = 24 * 3600
#: A key whose request is still in admission (a submit waiting for replicas) holds
#: this long at most, should its hive die in between.
ADMISSION_TTL_S = 30


def fair(queue: str) -> str:
    """Sorted set: the jobs waiting on the shared queue, by their fair-share tag
    (hive/jobs/submit.py); the shared RQ list is kept in this order."""
    return f"{PREFIX}:fair:{queue}"


def fair_tags(queue: str) -> str:
    """Hash: per API key, ``<round>:<job id>`` of its youngest job in ``fair``."""
    return f"{PREFIX}:fair-tags:{queue}"
# Webhooks (shared/webhooks.py enqueues, hive/webhooks/delivery.py delivers).

#: String: the cluster's webhook secret, random, set once by the first hive that needs
#: it (SET NX); each API key's signing secret is derived from it (hive/webhooks/secrets.py).
#: No TTL: losing it would change every key's secret.
WEBHOOK_SECRET = f"{PREFIX}:webhooks:secret"


def webhooks_due(queue: str) -> str:
    """Sorted set: the webhook deliveries of ``queue``'s jobs, members ``<job_id>:<event>``,
    scored by when the next attempt is due (Redis's clock). A hive claims one by moving
    its score a lease ahead (WEBHOOK_CLAIM_S), then reschedules or removes it. No TTL:
    it empties itself (each member leaves after its last attempt)."""
    return f"{PREFIX}:webhooks:due:{queue}"


def webhooks_output(queue: str) -> str:
    """Sorted set: running jobs of ``queue`` whose webhook wants ``output``, scored by
    when their next output delivery may go (at most one per WEBHOOK_OUTPUT_EVERY_S).
    A job leaves it when it ends."""
    return f"{PREFIX}:webhooks:output:{queue}"


def webhook_delivery(job_id: str, event: str) -> str:
    """Hash: one delivery of a job's webhook (``start``, ``completed`` or ``output``):
    its frozen body and webhook-id, attempts, outcome (TTL: JOB_TTL_S)."""
    return f"{PREFIX}:job:{job_id}:webhook:{event}"


#: A claimed delivery comes due again after this long if its hive died mid-attempt.
WEBHOOK_CLAIM_S = 60.0
WEBHOOK_OUTPUT_EVERY_S = 0.5


# Embeddings (hive/openai/embeddings.py answers them, worker/model/embedder.py computes them).


def job_embeddings(job_id: str) -> str:
    """String: an embedding job's vectors, base64 of little-endian float32, row after
    row (``job_record.EMBEDDING_DIM`` each), written just before the job's end
    (TTL: EMBEDDINGS_TTL_S). Apart from the record, so that up to MB of vectors
    live minutes, for the answer and a retry with its Idempotency-Key, not the job TTL."""
    return f"{PREFIX}:job:{job_id}:embeddings"


EMBEDDINGS_TTL_S = 15 * 60
