"""Redis clients, built one way for the hive and the workers.

After Redis restarts, every pooled connection is dead; without retries the first
command on each fails. These clients reconnect and retry a failed command a few
times with a short backoff (≈0.5 s in all), then raise, which the hive turns into
503 and the worker into an error.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

RETRIES = 3
_RETRY_ON = [ConnectionError, TimeoutError]


def sync_client(url: str, **options) -> redis.Redis:
    retry = redis.retry.Retry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES)
    return redis.Redis.from_url(url, retry=retry, retry_on_error=_RETRY_ON, **options)


def async_client(url: str, **options) -> aioredis.Redis:
    retry = AsyncRetry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=_RETRY_ON, **options)
