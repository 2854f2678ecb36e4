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

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

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
