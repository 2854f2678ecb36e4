"""``hive up``'s embedded Redis (fakeredis' TCP server) under RQ's own worker, in
this process: what RQ 3 asks of a server as a worker starts (CLIENT SETNAME,
CLIENT INFO, INFO) and a job through a slot's whole loop. The run with a real
``hive up`` is in tests/test_cli.py."""

from __future__ import annotations

import threading

import pytest
import redis
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from hive.embedded import _fake_redis_server, free_port
from worker.cluster.rq_outages import SlotQueue
from worker.cluster.rq_slots import SlotWorker

pytestmark = pytest.mark.unit


def double(n: int) -> int:
    return 2 * n


@pytest.fixture()
def fake_redis():
    server = _fake_redis_server(free_port())
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    host, port = server.server_address
    client = redis.Redis(host=host, port=port)
    yield client
    client.close()
    server.shutdown()
    server.server_close()


def test_a_slot_worker_starts_and_runs_a_job_on_the_embedded_redis(fake_redis):
    # Warnings are errors here: RQ warns "CLIENT LIST command not supported" when the
    # server cannot say the worker's address (fakeredis before 2.36.2 under RQ 3).
    queue = SlotQueue("embedded", connection=fake_redis, serializer=JSONSerializer)
    job = queue.enqueue(double, 21)
    worker = SlotWorker([queue], connection=fake_redis, serializer=JSONSerializer, stopping=threading.Event(), main=False)
    assert "127.0.0.1" in worker.ip_address  # fakeredis writes it as a Python tuple: ('127.0.0.1', port)
    assert worker.work(burst=True, logging_level="WARNING")
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED and job.return_value() == 42
