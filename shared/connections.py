"""Redis clients, built one way for the hive and the workers.

After Redis restarts, every pooled connection is dead; without retries the first
command on each fails. These clients reconnect and retry a failed command a few
times with a short backoff (≈0.5 s in all), then raise, which the hive turns into
503 and the worker into an error.

The pools block: a burst of requests (a few hundred streams opening at once) waits
for one of POOL_SIZE connections instead of failing with "Too many connections",
which redis-py's default pool (100 connections, no waiting) answers.

A Sentinel URL (shared/redis_url.py) gives clients that ask the Sentinels where
the master is, and ask again when a command finds it gone: on a failover, the old
master's READONLY replies and the UNBLOCKED error it sends to blocked BLPOPs
become ConnectionErrors in redis-py's Sentinel connection, which these clients
retry against the new master. Scripts survive it too: redis-py's Script reloads
itself on NOSCRIPT (the promoted replica's script cache starts empty). A new master
that refuses writes until a replica has resynced (NOREPLICAS, with
min-replicas-to-write) raises WritesRefused, a ConnectionError: retried, then
waited out (the worker) or answered 503 (the hive) like an outage.
"""

from __future__ import annotations

import logging
import socket
import time

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import DefaultParser as AsyncDefaultParser
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.connection import DefaultParser
from redis.exceptions import ConnectionError, TimeoutError
from redis.sentinel import Sentinel, SentinelConnectionPool

from . import keys
from .redis_url import SentinelTarget, is_sentinel, parse_sentinel_url
from .settings import redact_url

RETRIES = 3
#: What a Redis that cannot be reached raises (WritesRefused included): retried, then
#: waited out (the worker) or answered 503 (the hive); never a bug.
REDIS_DOWN = (ConnectionError, TimeoutError)
_RETRY_ON = list(REDIS_DOWN)
POOL_SIZE = 64
#: How long a command waits for a free pooled connection before it fails.
POOL_TIMEOUT_S = 10.0
#: Sentinel queries: a Sentinel that does not answer this fast is passed over for the next.
SENTINEL_TIMEOUT_S = 1.0


#: How long a new connection may take to open before the command fails (and is retried).
CONNECT_TIMEOUT_S = 5.0


def dead_peer_options() -> dict:
    """Options for a client whose threads must not hang on a peer that is gone (a cable
    pulled, a host lost): ``sync_client(url, **dead_peer_options())``. Keepalive probes
    from 5 s of idleness, every 2 s, 3 unanswered and the connection is dropped; and
    TCP_USER_TIMEOUT drops one whose sent data stays unacknowledged for 10 s (a command
    sent into the cut). Without them a connection waits on a dead peer for the kernel's
    retransmission limit, about 15 minutes, and so does the thread that waits on it:
    found with a worker's heartbeat still stuck after its partition had healed. The
    kernel answers probes, so a busy Redis is never taken for a dead one."""
    tcp = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 10_000}
    options = {getattr(socket, name): value for name, value in tcp.items() if hasattr(socket, name)}  # Linux's; elsewhere fewer
    return {"socket_keepalive": True, "socket_keepalive_options": options, "socket_connect_timeout": CONNECT_TIMEOUT_S}


class WritesRefused(ConnectionError):
    """The master refuses writes for now: NOREPLICAS (fewer replicas than its
    min-replicas-to-write, as right after a failover while they resync) or
    MASTERDOWN. A ConnectionError, so that it is retried and waited out like one;
    redis-py raises a plain ResponseError, which every caller would take for a bug."""


_TRANSIENT_ERRORS = {"NOREPLICAS": WritesRefused, "MASTERDOWN": WritesRefused}


class _Parser(DefaultParser):
    EXCEPTION_CLASSES = {**DefaultParser.EXCEPTION_CLASSES, **_TRANSIENT_ERRORS}


class _AsyncParser(AsyncDefaultParser):
    EXCEPTION_CLASSES = {**AsyncDefaultParser.EXCEPTION_CLASSES, **_TRANSIENT_ERRORS}


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's master pool, blocking as ours do: redis-py's raises "Too many
    connections" when all are in use."""


class _AsyncBlockingSentinelPool(AsyncSentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The same, for asyncio."""


def sync_client(url: str, max_connections: int = POOL_SIZE, **options) -> redis.Redis:
    retry = redis.retry.Retry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES)
    pool_options = dict(
        max_connections=max_connections, timeout=POOL_TIMEOUT_S, retry=retry, retry_on_error=_RETRY_ON, parser_class=_Parser, **options
    )
    if is_sentinel(url):
        target = parse_sentinel_url(url)
        sentinel = Sentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target))
        return sentinel.master_for(target.master, connection_pool_class=_BlockingSentinelPool, **_master_options(target), **pool_options)
    pool = redis.BlockingConnectionPool.from_url(url, **pool_options)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # close() releases the pool, as with from_url
    return client


def async_client(url: str, **options) -> aioredis.Redis:
    retry = AsyncRetry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES)
    pool_options = dict(
        max_connections=POOL_SIZE, timeout=POOL_TIMEOUT_S, retry=retry, retry_on_error=_RETRY_ON, parser_class=_AsyncParser, **options
    )
    if is_sentinel(url):
        target = parse_sentinel_url(url)
        sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target))
        return sentinel.master_for(
            target.master, connection_pool_class=_AsyncBlockingSentinelPool, **_master_options(target), **pool_options
        )
    pool = aioredis.BlockingConnectionPool.from_url(url, **pool_options)
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() releases the pool, as with from_url
    return client


def _sentinel_options(target: SentinelTarget) -> dict:
    """How to reach the Sentinels themselves: their own credentials, TLS, and a
    short timeout, so that master discovery moves on from one that is down."""
    options: dict = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
    if target.sentinel_username:
        options["username"] = target.sentinel_username
    if target.sentinel_password:
        options["password"] = target.sentinel_password
    if target.ssl:
        options["ssl"] = True
    return options


def _master_options(target: SentinelTarget) -> dict:
    options: dict = {"db": target.db, "username": target.username, "password": target.password}
    if target.ssl:
        options["ssl"] = True
    return options


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
    except REDIS_DOWN:
        return False


def preflight(url: str) -> None:
    """Raises RedisUnusable for a URL that can never work; an unreachable Redis is
    fine here (the process waits for it: ``wait_for_redis``)."""
    try:
        if is_sentinel(url):
            client = sync_client(url, socket_connect_timeout=2, socket_timeout=2)
        else:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    except ValueError as e:  # our Sentinel URL parser or redis-py's: an unknown scheme, a bad port or db
        raise RedisUnusable(f"bad Redis URL {redact_url(url)}: {e}") from e
    try:
        _answers(client, url)
    finally:
        client.close()


def takes_writes(client: redis.Redis) -> bool:
    """Whether Redis takes a write now (a PING is answered by a master that still
    refuses writes), after an outage or a failover."""
    try:
        client.set(keys.WRITE_PROBE, 1, px=keys.WRITE_PROBE_TTL_MS)
        return True
    except REDIS_DOWN:
        return False


def wait_for_writes(client: redis.Redis) -> float:
    """Blocks until Redis takes writes again; returns how long that took."""
    down_since = time.monotonic()
    while not takes_writes(client):
        time.sleep(WAIT_POLL_S)
    return time.monotonic() - down_since


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
