"""Whether this worker is alive, for its supervisor, and what it does when it is wedged.

Alive means heartbeating: the hive routes by the heartbeat (a worker silent for
``keys.WORKER_DEAD_AFTER_S`` is dead to it), so a supervisor should judge by it too.
``GET /livez`` on the metrics port answers 200 while the last heartbeat is at most
``STALE_AFTER_S`` old and 503 otherwise; ``hive worker --check`` asks it (compose's
healthcheck, a Kubernetes exec probe).

A worker whose heartbeats fail while Redis itself answers is wedged: found under load
(issue 19), a worker whose connection pool was used up logged ``heartbeat failed``
every second for good while its process stayed up, so nothing restarted it. The
watchdog tells the two apart with a connection of its own, outside the pool: Redis
answers, yet no heartbeat got through for ``WEDGED_AFTER_S`` since it does (a lease
and more: every job of this worker has been taken over by then) → one log line and
exit 70, for the supervisor to restart it. Redis does not answer (an outage, a
partition) → the worker waits, and recovers on its own once Redis is back, as it
always has: the worker's connections give up on a dead peer within seconds
(shared/connections.py DEAD_PEER_OPTIONS), so a heartbeat stuck on a connection the
partition killed fails and the next one reconnects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from shared import keys
from shared.connections import REDIS_DOWN, sync_client
from worker.cluster.presence import Presence

log = logging.getLogger("hive.worker")

#: /livez fails past this: three missed heartbeats, when the hive has dropped the worker.
STALE_AFTER_S = keys.WORKER_DEAD_AFTER_S
#: Heartbeats failing this long while Redis answers: wedged. Past a lease (LEASE_S)
#: the hive has taken every job over; twice that leaves room for a slow machine.
WEDGED_AFTER_S = 2 * keys.LEASE_S
#: BSD's EX_SOFTWARE: an internal fault (compose's on-failure and systemd's
#: Restart=on-failure restart it; a clean exit, 0, is a requested stop).
EXIT_WEDGED = 70
#: How long the watchdog's own Redis probe may take.
PROBE_TIMEOUT_S = 2.0


class Liveness:
    def __init__(self, presence: Presence, redis_url: str, exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic):
        """``exit``: os._exit by default: a wedged process's threads may hold the
        locks a clean exit waits on. ``clock``: what ``presence.last_beat_at`` reads."""
        self._presence = presence
        self._redis_url = redis_url
        self._exit = exit
        self._clock = clock
        #: Since when Redis has answered the watchdog while the heartbeat was stale.
        self._answering_since: float | None = None
        self._thread = threading.Thread(target=self._watch_forever, name="hive-liveness", daemon=True)

    def heartbeat_age_s(self) -> float:
        return self._clock() - self._presence.last_beat_at

    def alive(self) -> bool:
        return self.heartbeat_age_s() <= STALE_AFTER_S

    def status(self) -> dict:
        """What /livez answers."""
        return {"alive": self.alive(), "heartbeat_age_s": round(self.heartbeat_age_s(), 3), "last_error": self._presence.last_beat_error}

    def start(self) -> None:
        self._thread.start()

    def check_once(self) -> bool:
        """Whether the worker is wedged (and exits, through ``exit``): heartbeats have
        failed for WEDGED_AFTER_S while Redis answered. Counted from when Redis answers
        again: after a partition heals, the heartbeat gets that long to get through."""
        if self.alive():
            self._answering_since = None
            return False
        if not self._redis_answers():
            self._answering_since = None  # an outage or a partition: waited out
            return False
        now = self._clock()
        if self._answering_since is None:
            self._answering_since = now
        silent_s = now - max(self._answering_since, self._presence.last_beat_at)
        if silent_s <= WEDGED_AFTER_S:
            return False
        log.critical(
            "worker wedged: no heartbeat for %.0f s while Redis answers (last error: %s); exiting %d for the supervisor to restart it",
            self.heartbeat_age_s(), self._presence.last_beat_error or "none: the heartbeat thread is stuck", EXIT_WEDGED,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(EXIT_WEDGED)
        return True

    def _redis_answers(self) -> bool:
        probe = sync_client(self._redis_url, max_connections=1, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
        try:
            return bool(probe.ping())
        except (*REDIS_DOWN, redis.RedisError):
            return False
        finally:
            probe.close()

    def _watch_forever(self) -> None:
        while True:
            time.sleep(keys.HEARTBEAT_S)
            try:
                if self.check_once():
                    return
            except Exception:  # watchdog loop boundary: look again next second
                log.exception("liveness check failed")
