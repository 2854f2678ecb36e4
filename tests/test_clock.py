"""RedisClock against a real redis-server (and fakeredis, which `hive up` serves):
Redis's time without a round trip, whatever the host's wall clock says."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from shared.clock import RedisClock

pytestmark = pytest.mark.timeout(30)


def redis_time(connection: redis.Redis) -> float:
    seconds, microseconds = connection.time()
    return seconds + microseconds / 1e6


@pytest.mark.e2e
def test_now_is_redis_time_even_when_the_host_clock_is_off(redis_url, monkeypatch):
    connection = redis.Redis.from_url(redis_url)
    clock = RedisClock(connection)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 10)  # this host runs 10 s behind
    assert clock.now() == pytest.approx(real_time() - 10, abs=0.5)  # not measured yet: the host's own
    assert clock.measure() == pytest.approx(-10, abs=0.5)
    for _ in range(3):
        assert clock.now() == pytest.approx(redis_time(connection), abs=0.05)
    connection.close()


@pytest.mark.e2e
def test_the_thread_measures_at_once_and_stops(redis_url):
    connection = redis.Redis.from_url(redis_url)
    clock = RedisClock(connection)
    clock.start(wait_s=5)
    assert clock.measured
    clock.remeasure()
    clock.stop()
    assert clock.now() == pytest.approx(redis_time(connection), abs=0.05)
    connection.close()


@pytest.mark.unit
def test_an_unreachable_redis_leaves_the_host_clock_until_it_answers():
    connection = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    clock = RedisClock(connection)
    with pytest.raises(redis.ConnectionError):
        clock.measure()
    clock.start(wait_s=0.3)
    assert not clock.measured and clock.now() == pytest.approx(time.time(), abs=0.05)
    clock.stop()


@pytest.mark.unit
def test_fakeredis_answers_time():
    """The embedded mode's Redis (`hive up` without redis-server)."""
    clock = RedisClock(fakeredis.FakeRedis())
    clock.measure()
    assert clock.now() == pytest.approx(time.time(), abs=0.05)
