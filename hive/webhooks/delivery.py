"""Delivering webhooks, apart from jobs, workers and cancels: driven from Redis.

Deliveries are enqueued with the state that calls for them (shared/webhooks.py) into
a sorted set per queue, scored by when each is due. Every hive process runs this
loop: ten times a second it claims the due ones in one script, which moves each a
claim lease ahead (WEBHOOK_CLAIM_S), so exactly one hive makes each attempt; then it
reschedules the delivery (a retry) or removes it. A hive that dies mid-attempt
leaves its claim to run out, and another hive, or itself restarted, tries again
with the same webhook-id. Nothing of a delivery lives in a hive process.

The body is the job's status JSON (the webhook's own part left out), frozen at the
first attempt into the delivery's hash: every attempt sends the same bytes, signed
with a fresh timestamp. Only the end's delivery is retried: on a connection error,
a timeout, 408, 429 and 5xx, after the next of ``--webhook-retry-delays`` (stretched
by up to a quarter at random, and at least the receiver's Retry-After). Redirects
are never followed; any other status is final. ``start`` and ``output`` deliveries
are one attempt each; ``output`` at most every WEBHOOK_OUTPUT_EVERY_S per job.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import redis.asyncio as aioredis
import redis.exceptions
from standardwebhooks import Webhook

from hive.webhooks.guard import WebhookRefused, pinned, resolve
from hive.webhooks.secrets import WebhookSecrets
from shared import events, job_record, keys, webhooks
from shared.clock import RedisClock
from shared.settings import Settings
from shared.spec import FINAL_STATES

log = logging.getLogger("hive.webhooks")

PERIOD_S = 0.1
#: Attempts in flight at once per hive process; the rest wait in Redis.
CONCURRENCY = 32
REQUEST_TIMEOUT_S = 10.0
#: A Retry-After longer than this is taken as this.
MAX_RETRY_AFTER_S = 3600.0
_FINAL = {s.value for s in FINAL_STATES}

# Claims up to ARGV[3] deliveries due by ARGV[1]: each moves to ARGV[2] (the claim's
# lease, or the output throttle), so no other hive takes it meanwhile.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


@dataclass(frozen=True)
class Outcome:
    """One attempt: the HTTP status (None without an answer), why it failed, and
    whether that failure is worth another attempt."""

    status: int | None
    error: str | None = None
    retry: bool = False
    retry_after_s: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def signed_headers(secret: str, msg_id: str, timestamp: float, body: bytes) -> dict[str, str]:
    """Standard Webhooks' three headers for ``body``."""
    at = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }


def retry_after_s(value: str | None, now: float) -> float:
    """A Retry-After header (seconds or an HTTP date) as seconds from ``now``."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def payload(job_id: str, record: dict[str, str]) -> dict:
    """The body: the job's status, without the webhook's own state (which the
    delivery itself changes)."""
    view = job_record.status_view(job_id, record)
    view.pop("webhook", None)
    return view


def encode(view: dict) -> bytes:
    return json.dumps(view, ensure_ascii=False, separators=(",", ":")).encode()


class WebhookSender:
    def __init__(self, settings: Settings, connection: aioredis.Redis, clock: RedisClock, secrets: WebhookSecrets):
        """``connection``: decoding responses to str. ``clock``: due times and the
        signature's timestamp (Redis's clock, which the hosts share)."""
        self.settings = settings
        self.redis = connection
        self.clock = clock
        self.secrets = secrets
        self._due = keys.webhooks_due(settings.queue)
        self._output = keys.webhooks_output(settings.queue)
        self._claim = connection.register_script(_CLAIM)
        # No proxies from the environment: the address guard checks where the request goes.
        # No kept-alive connections: pooled by address, one verified for one host name
        # could carry the delivery of another name on that address.
        self._http = httpx.AsyncClient(
            follow_redirects=False, timeout=REQUEST_TIMEOUT_S, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self._attempts: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="hive-webhooks")

    async def stop(self) -> None:
        """Attempts in flight are dropped: their claims run out and another hive
        (or this one, restarted) makes them again."""
        # Said as well as cancelled: redis-py may turn a cancel in mid-command into a
        # ConnectionError, which the loop takes for an outage and waits out.
        self._stopping = True
        tasks = [t for t in (self._task, *self._attempts) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    async def _run_forever(self) -> None:
        redis_away = False
        while not self._stopping:
            try:
                await self.deliver_due()
                if redis_away:
                    log.warning("webhooks: Redis answers again")
                    redis_away = False
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                if not redis_away:
                    log.warning("webhooks: Redis unavailable (%s); deliveries wait for it", e)
                    redis_away = True
            except Exception:  # delivery loop boundary: log and look again next period
                log.exception("webhooks: claiming due deliveries failed")
            await asyncio.sleep(PERIOD_S)

    async def deliver_due(self) -> None:
        """Claims what is due, within this process's room, and starts each attempt."""
        now = self.clock.now()
        room = CONCURRENCY - len(self._attempts)
        if room > 0:
            for member in await self._claim(keys=[self._due], args=[now, now + keys.WEBHOOK_CLAIM_S, room]):
                self._spawn(self.attempt(member), member)
        room = CONCURRENCY - len(self._attempts)
        if room > 0:
            for job_id in await self._claim(keys=[self._output], args=[now, now + keys.WEBHOOK_OUTPUT_EVERY_S, room]):
                self._spawn(self.deliver_output(job_id), f"{job_id}:output")

    def _spawn(self, coroutine, what: str) -> None:
        async def guarded() -> None:
            try:
                await coroutine
            except asyncio.CancelledError:
                raise
            except Exception:  # one attempt's boundary: its claim runs out and it is tried again
                log.exception("webhook %s: the attempt failed", what)

        task = asyncio.create_task(guarded(), name=f"webhook {what}")
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def attempt(self, member: str) -> Outcome | None:
        """One attempt of a claimed delivery (``<job_id>:<event>``); then it is
        rescheduled or done. Returns its outcome (None: nothing left to deliver)."""
        job_id, event = webhooks.parse_member(member)
        delivery_key = keys.webhook_delivery(job_id, event)
        record = await self.redis.hgetall(keys.job(job_id))
        if not record or not await self.redis.exists(delivery_key):
            await self.redis.zrem(self._due, member)  # expired with its job
            return None
        # Frozen once: every attempt sends these bytes.
        await self.redis.hsetnx(delivery_key, "body", encode(payload(job_id, record)))
        body = (await self.redis.hget(delivery_key, "body")).encode()
        attempt = await self.redis.hincrby(delivery_key, "attempts", 1)
        final = event == webhooks.COMPLETED
        if final:
            await self.redis.hset(keys.job(job_id), mapping={job_record.WEBHOOK_STATE: "delivering", job_record.WEBHOOK_ATTEMPTS: attempt})
        url = json.loads(record.get(job_record.SPEC) or "{}").get("webhook") or ""
        outcome = await self.send(url, webhooks.message_id(job_id, event), body, record.get(job_record.OWNER) or "")
        delays = self.settings.webhook_retry_delays
        if final and outcome.retry and attempt <= len(delays):
            delay = max(delays[attempt - 1] * random.uniform(1.0, 1.25), outcome.retry_after_s)
            state, then = "pending", f"again in {delay:.3g} s"
            await self.redis.zadd(self._due, {member: self.clock.now() + delay})
        else:
            state = then = "delivered" if outcome.delivered else "failed"
            await self.redis.zrem(self._due, member)
        if final:
            fields = {job_record.WEBHOOK_STATE: state, job_record.WEBHOOK_STATUS: outcome.status or "", job_record.WEBHOOK_ERROR: outcome.error or ""}
            await self.redis.hset(keys.job(job_id), mapping=fields)
        level = logging.INFO if outcome.delivered else logging.WARNING
        log.log(level, "job %s: webhook %s attempt %d: %s (%s)", job_id, event, attempt, outcome.status or outcome.error, then)
        return outcome

    async def deliver_output(self, job_id: str) -> Outcome | None:
        """The output so far, once (fire and forget), if it grew since the last one."""
        record = await self.redis.hgetall(keys.job(job_id))
        if not record or record.get(job_record.STATE) in _FINAL:
            await self.redis.zrem(self._output, job_id)  # the end's own delivery says the rest
            return None
        text, seq = [], 0
        for entry_id, fields in await self.redis.xrange(keys.job_events(job_id)):
            for seq_, type_, data in events.log_events(entry_id, fields.get("e", ""), fields.get("d", "{}")):
                if type_ == events.Token.type:
                    text.append(json.loads(data)["t"])
                    seq = seq_
        delivery_key = keys.webhook_delivery(job_id, webhooks.OUTPUT)
        if seq <= int(await self.redis.hget(delivery_key, "seq") or 0):
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(delivery_key, "seq", seq)
            pipe.expire(delivery_key, self.settings.job_ttl_s)
            await pipe.execute()
        view = payload(job_id, record)
        view["output"] = "".join(text)
        url = json.loads(record.get(job_record.SPEC) or "{}").get("webhook") or ""
        outcome = await self.send(url, webhooks.message_id(job_id, webhooks.OUTPUT, seq), encode(view), record.get(job_record.OWNER) or "")
        if not outcome.delivered:
            log.info("job %s: webhook output (event %d) not delivered: %s", job_id, seq, outcome.status or outcome.error)
        return outcome

    async def send(self, url: str, msg_id: str, body: bytes, owner: str) -> Outcome:
        """One signed POST of ``body`` to ``url``, to an address checked just now."""
        target, extra_headers, extensions = url, {}, {}
        try:
            addresses = await resolve(url, self.settings.webhook_allow_private)
            if not self.settings.webhook_allow_private:
                target, extra_headers, extensions = pinned(url, addresses[0])
        except WebhookRefused as e:
            # A name that does not resolve may be a passing DNS failure; a refused address is not.
            return Outcome(None, f"{e.code}: {e}", retry=e.code == "WEBHOOK_UNRESOLVABLE")
        headers = {
            "content-type": "application/json",
            "user-agent": "hive-webhooks",
            **extra_headers,
            **signed_headers(await self.secrets.for_owner(owner), msg_id, self.clock.now(), body),
        }
        try:
            # Streamed and never read: a receiver's answer body is none of the hive's business.
            async with self._http.stream("POST", target, content=body, headers=headers, extensions=extensions) as response:
                status = response.status_code
                retry_after = retry_after_s(response.headers.get("retry-after"), self.clock.now())
        except httpx.TimeoutException as e:
            return Outcome(None, f"timed out: {type(e).__name__}", retry=True)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            return Outcome(None, f"{type(e).__name__}: {e}", retry=True)
        if 200 <= status < 300:
            return Outcome(status)
        if status in (408, 429) or status >= 500:
            return Outcome(status, f"HTTP {status}", retry=True, retry_after_s=retry_after)
        return Outcome(status, f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else ""))
