"""One clock for the whole cluster: Redis's.

Hive compares times written by one process with times taken by another, often on
another host: a worker's lease deadline and heartbeat with a hive's "now", a job's
submit time with a reaper's queue-wait cut-off. Hosts' clocks disagree (by seconds,
without time sync), so every time written to Redis, and every cut-off compared with
one, is read off Redis's clock (``TIME``) instead of the host's.

Without a round trip per reading: each process measures once how far Redis's clock
is from its own monotonic clock, taking the midpoint of the round trip, and counts
on from there with ``time.monotonic()`` (so a step of the host's wall clock changes
nothing either). A thread measures again every REMEASURE_S, which follows a
failover to a master with another clock, and sooner when told Redis came back.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger(__name__)

#: How often the offset is measured again (a failover may bring another master's clock).
REMEASURE_S = 30.0
#: How often a measurement that failed (Redis away) is tried again.
RETRY_S = 0.5
#: TIME readings per measurement: the one with the shortest round trip is kept.
SAMPLES = 3
#: A host clock this far from Redis's is worth a line in the log (harmless to Hive now).
SKEW_WORTH_SAYING_S = 1.0


class RedisClock:
    """Redis's clock, read locally: ``now()`` is Unix time as Redis's ``TIME`` says
    it, give or take half a round trip. One per process, from its Redis client.

    Until the first measurement succeeds (Redis not reachable yet), ``now()`` is the
    host's own ``time.time()``."""

    def __init__(self, connection: redis.Redis, remeasure_s: float = REMEASURE_S):
        self._redis = connection
        self._remeasure_s = remeasure_s
        # (Redis's Unix time, time.monotonic() at that moment): replaced whole, so a
        # reader on another thread never sees half of a new measurement.
        self._anchor: tuple[float, float] | None = None
        self._wake = threading.Event()
        self._first = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def measured(self) -> bool:
        return self._anchor is not None

    def now(self) -> float:
        """Unix seconds on Redis's clock."""
        anchor = self._anchor
        if anchor is None:
            return time.time()
        redis_at, monotonic_at = anchor
        return redis_at + (time.monotonic() - monotonic_at)

    def measure(self) -> float:
        """Reads Redis's clock now (SAMPLES round trips); returns how far the host's
        wall clock is from it, in seconds (positive: the host is ahead). Raises
        redis' ConnectionError or TimeoutError when Redis is away."""
        best: tuple[float, float, float] | None = None  # (round trip, Redis's time, monotonic midpoint)
        for _ in range(SAMPLES):
            sent = time.monotonic()
            seconds, microseconds = self._redis.time()
            received = time.monotonic()
            if best is None or received - sent < best[0]:
                best = (received - sent, seconds + microseconds / 1e6, (sent + received) / 2)
        _, redis_at, monotonic_at = best
        first = self._anchor is None
        self._anchor = (redis_at, monotonic_at)
        host_ahead_s = time.time() - self.now()
        if first and abs(host_ahead_s) >= SKEW_WORTH_SAYING_S:
            log.warning("this host's clock is %.1f s %s Redis's; Hive keeps time by Redis's", abs(host_ahead_s),
                        "ahead of" if host_ahead_s > 0 else "behind")
        return host_ahead_s

    def start(self, wait_s: float = 0.0) -> None:
        """Measures in a daemon thread: at once, then every REMEASURE_S (every RETRY_S
        while Redis is away). ``wait_s``: wait that long for the first measurement
        (a worker, whose Redis just answered); the hive's event loop does not wait."""
        self._thread = threading.Thread(target=self._measure_forever, name="hive-clock", daemon=True)
        self._thread.start()
        if wait_s:
            self._first.wait(wait_s)

    def remeasure(self) -> None:
        """Redis answers again after an outage (maybe another master, with another
        clock): measure now rather than at the next period."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _measure_forever(self) -> None:
        while not self._stopping.is_set():
            # Measuring loop boundary: a failure keeps the last offset and tries again soon.
            wait_s = RETRY_S
            try:
                self.measure()
                self._first.set()
                wait_s = self._remeasure_s
            except (redis.ConnectionError, redis.TimeoutError) as e:  # Redis away: said by whoever needs it
                log.debug("measuring Redis's clock failed: %s", e)
            except Exception:
                log.exception("measuring Redis's clock failed")
            self._wake.wait(wait_s)
            self._wake.clear()
