"""Redis clients, built one way for the hive and the workers.

After Redis restarts, every pooled connection is dead; without retries the first
command on each fails. These clients reconnect and retry a failed command a few
times with a short backoff (≈0.5 s in all), then raise, which the hive turns into
503 and the worker into an error.

The pools block: a burst of requests (a few hundred streams opening at once) waits
for one of POOL_SIZE connections instead of failing with "Too many connections",
which redis-py's default pool (100 connections, no waiting) answers.
"""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from .settings import redact_url

RETRIES = 3
_RETRY_ON = [ConnectionError, TimeoutError]
POOL_SIZE = 64
#: How long a command waits for a free pooled connection before it fails.
POOL_TIMEOUT_S = 10.0


def sync_client(url: str, max_connections: int = POOL_SIZE, **options) -> redis.Redis:
    retry = redis.retry.Retry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_TIMEOUT_S, retry=retry, retry_on_error=_RETRY_ON, **options
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # close() releases the pool, as with from_url
    return client


def async_client(url: str, **options) -> aioredis.Redis:
    retry = AsyncRetry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=POOL_TIMEOUT_S, retry=retry, retry_on_error=_RETRY_ON, **options
    )
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() releases the pool, as with from_url
    return client


#: How often a process that waits for Redis at start-up says so in its log.
WAIT_LOG_S = 5.0
WAIT_POLL_S = 0.5


class RedisUnusable(Exception):
    """A Redis URL that can never work (malformed, or credentials Redis refuses):
    waiting would not help, so the process stops with this one line."""


def _answers(client: redis.Redis, url: str) -> bool:
    """One PING: True if Redis answers, False if it cannot be reached (yet)."""
    try:
        client.ping()
        return True
    except redis.AuthenticationError as e:  # a ConnectionError too: test it first
        raise RedisUnusable(f"Redis at {redact_url(url)} refused the credentials: {e}") from e
    except redis.ResponseError as e:  # NOAUTH and the like: a setting, not a moment
        raise RedisUnusable(f"Redis at {redact_url(url)} refused the connection: {e}") from e
    except (ConnectionError, TimeoutError):
        return False


def preflight(url: str) -> None:
    """Raises RedisUnusable for a URL that can never work; an unreachable Redis is
    fine here (the process waits for it: ``wait_for_redis``)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    except ValueError as e:  # redis-py's own URL parser: an unknown scheme, a bad port or db
        raise RedisUnusable(f"bad Redis URL {redact_url(url)}: {e}") from e
    try:
        _answers(client, url)
    finally:
        client.close()


def wait_for_redis(client: redis.Redis, url: str, who: str, log: logging.Logger) -> None:
    """Blocks until Redis answers, saying every WAIT_LOG_S what it waits for: in a
    cluster, processes start in any order (systemd, Kubernetes, a Redis host
    rebooting), so one that finds no Redis waits rather than exits."""
    said_at = None
    while not _answers(client, url):
        now = time.monotonic()
        if said_at is None or now - said_at >= WAIT_LOG_S:
            log.warning("%s: waiting for Redis at %s to answer", who, redact_url(url))
            said_at = now
        time.sleep(WAIT_POLL_S)
    if said_at is not None:
        log.warning("%s: Redis at %s answers", who, redact_url(url))
