"""Webhooks end to end: a real hive and worker, a real receiver verifying with
standardwebhooks; and the address guard and the signature on their own."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from hive.webhooks.delivery import WebhookSender, retry_after_s, signed_headers
from hive.webhooks.guard import WebhookRefused, pinned, refusal, resolve
from shared.settings import Settings
from tests import processes
from tests.sse import status, submit
from tests.webhook_receiver import Receiver

PROMPT = "The quick brown fox"
#: Three retries, milliseconds apart: a failing delivery makes 4 attempts in all.
RETRY_DELAYS = "0.05,0.05,0.05"


@dataclass
class WebhookCluster:
    url: str
    hive_command: list[str]
    log_dir: Path
    hive: processes.Proc
    worker: processes.Proc
    restarts: int = 0

    def restart_hive(self) -> float:
        """Stops the hive and starts another on the same port and Redis; returns
        when the first had exited (time.monotonic())."""
        self.hive.stop()
        stopped_at = time.monotonic()
        self.restarts += 1
        self.hive = processes.start(f"hive-webhooks-{self.restarts}", self.hive_command, self.log_dir)
        processes.wait_until(lambda: processes.health(self.url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "restarted hive", (self.hive,))
        return stopped_at


@pytest.fixture(scope="module")
def webhook_cluster(redis_url, hub, log_dir, tmp_path_factory):
    """A hive that may call loopback (the receiver) with retries milliseconds apart,
    and one worker running one job at a time, 20 ms a token (so a job can be caught
    running, and another kept waiting behind it)."""
    port = processes.free_port()
    queue = "hive:test-webhooks"
    command = processes.hive_command(
        "serve", "--redis-url", redis_url, "--port", str(port), "--queue", queue,
        "--webhook-allow-private", "--webhook-retry-delays", RETRY_DELAYS,
    )
    hive = processes.start("hive-webhooks", command, log_dir)
    worker = processes.start(
        "worker-webhooks",
        processes.hive_command("worker", "--redis-url", redis_url, "--queue", queue, "--device", "cpu", "--max-batch", "1", "--token-delay-ms", "20"),
        log_dir,
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path_factory.mktemp("hf-webhooks")), "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    cluster = WebhookCluster(f"http://127.0.0.1:{port}", command, log_dir, hive, worker)
    try:
        processes.wait_until(lambda: processes.health(cluster.url).get("workers", 0) >= 1, processes.STARTUP_TIMEOUT_S, "webhook cluster", (hive, worker))
        yield cluster
    finally:
        worker.stop()
        cluster.hive.stop()


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.close()


def secret_of(url: str) -> str:
    response = httpx.get(f"{url}/v1/webhooks/default/secret", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["key"]


def webhook_of(url: str, job_id: str, until, timeout_s: float = 30) -> dict:
    """The job's status once ``until(status)`` holds."""
    seen: dict = {}

    def check() -> bool:
        seen.update(status(url, job_id))
        return until(seen)

    processes.wait_until(check, timeout_s, f"job {job_id}: {seen}")
    return seen


def webhook_state(state: str):
    return lambda s: (s.get("webhook") or {}).get("state") == state


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_delivery_verifies_and_a_tampered_one_does_not(webhook_cluster, receiver):
    secret = secret_of(webhook_cluster.url)
    assert secret.startswith("whsec_") and secret == secret_of(webhook_cluster.url)
    job = submit(webhook_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=4, temperature=0, webhook=receiver.url("/signed"))
    [delivery] = receiver.wait_for("/signed", 1, timeout_s=60)
    body = delivery.verify(secret)
    final = webhook_of(webhook_cluster.url, job["job_id"], webhook_state("delivered"))
    assert body["job_id"] == job["job_id"] and body["state"] == "completed"
    assert body["output"] == final["output"] and body["tokens_out"] == 4 and body["timings"]["total_ms"] > 0
    assert "webhook" not in body and delivery.headers["content-type"] == "application/json"
    assert delivery.id == f"msg_{job['job_id']}_completed"
    assert final["webhook"] == {"events_filter": ["completed"], "state": "delivered", "attempts": 1, "last_status": 200, "last_error": None}

    flipped = bytearray(delivery.body)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(bytes(flipped), delivery.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode()).verify(delivery.body, delivery.headers)
    stale = signed_headers(secret, delivery.id, time.time() - 600, delivery.body)  # signed right, 10 minutes ago
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(delivery.body, stale)
    with pytest.raises(WebhookVerificationError):  # a fresh timestamp on the old signature
        Webhook(secret).verify(delivery.body, {**delivery.headers, "webhook-timestamp": str(int(time.time()) + 1)})


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_503_503_200_is_three_attempts_with_one_webhook_id(webhook_cluster, receiver):
    receiver.answer("/flaky", 503, 503)
    job = submit(webhook_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=4, webhook=receiver.url("/flaky"))
    final = webhook_of(webhook_cluster.url, job["job_id"], webhook_state("delivered"))
    attempts = receiver.at("/flaky")
    assert len(attempts) == 3
    assert {a.id for a in attempts} == {f"msg_{job['job_id']}_completed"}
    assert len({a.body for a in attempts}) == 1
    secret = secret_of(webhook_cluster.url)
    for attempt in attempts:
        attempt.verify(secret)
    assert final["webhook"]["attempts"] == 3 and final["webhook"]["last_status"] == 200


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_receiver_that_is_down_holds_up_nothing_and_ends_failed(webhook_cluster):
    down = f"http://127.0.0.1:{processes.free_port()}/down"  # nothing listens there
    url = webhook_cluster.url
    done = submit(url, model="acme/tiny", prompt=PROMPT, max_tokens=4, webhook=down)
    assert webhook_of(url, done["job_id"], lambda s: s["state"] == "completed")["state"] == "completed"

    # 300 tokens at 20 ms: running for 6 s, while the next job waits behind it (one slot).
    running = submit(url, model="acme/tiny", prompt=PROMPT, max_tokens=300, webhook=down)
    webhook_of(url, running["job_id"], lambda s: s["state"] == "running")
    waiting = submit(url, model="acme/tiny", prompt=PROMPT, max_tokens=4, webhook=down)
    started = time.monotonic()
    response = httpx.delete(f"{url}/v1/inference/{waiting['job_id']}", timeout=10)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"  # ended by the hive
    response = httpx.delete(f"{url}/v1/inference/{running['job_id']}", timeout=10)
    assert response.status_code == 202  # ended by its worker
    assert time.monotonic() - started < 2
    assert webhook_of(url, running["job_id"], lambda s: s["state"] == "cancelled")["state"] == "cancelled"

    for job, state in ((done, "completed"), (running, "cancelled"), (waiting, "cancelled")):
        final = webhook_of(url, job["job_id"], webhook_state("failed"))
        assert final["state"] == state
        hook = final["webhook"]
        assert hook["attempts"] == 4 and hook["last_status"] is None and "ConnectError" in hook["last_error"]


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_start_output_and_completed_each_get_a_signed_delivery(webhook_cluster, receiver):
    # 60 tokens at 20 ms: over a second of output, so more than one output delivery.
    job = submit(
        webhook_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=60,
        webhook=receiver.url("/events"), webhook_events_filter=["start", "output", "completed"],
    )
    job_id = job["job_id"]
    webhook_of(webhook_cluster.url, job_id, webhook_state("delivered"))
    secret = secret_of(webhook_cluster.url)
    received = {d.id: d.verify(secret) for d in receiver.at("/events")}
    assert received[f"msg_{job_id}_start"]["state"] == "running"
    assert received[f"msg_{job_id}_completed"]["state"] == "completed"
    outputs = [d for d in receiver.at("/events") if d.id.startswith(f"msg_{job_id}_output_")]
    assert len(outputs) >= 1 and len(received) == len(receiver.at("/events")) == 2 + len(outputs)
    final_output = received[f"msg_{job_id}_completed"]["output"]
    for earlier, later in zip(outputs, outputs[1:]):
        assert later.at - earlier.at >= 0.4  # at most one per 500 ms (Redis's clock; receipt jitters)
        assert final_output.startswith(earlier.json()["output"]) and len(later.json()["output"]) > len(earlier.json()["output"])


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_bad_webhook_fields_are_422_never_500(webhook_cluster):
    for fields in (
        {"webhook": "ftp://example.com/x"},
        {"webhook": "http://"},
        {"webhook": "http://user:pw@example.com/"},
        {"webhook": 42},
        {"webhook": "http://example.com/", "webhook_events_filter": ["finished"]},
        {"webhook": "http://example.com/", "webhook_events_filter": []},
        {"webhook": "http://example.com/", "webhook_events_filter": "completed"},
    ):
        response = httpx.post(f"{webhook_cluster.url}/v1/inference", json={"model": "acme/tiny", "prompt": PROMPT, **fields}, timeout=10)
        assert response.status_code == 422, (fields, response.text)
        assert response.json()["error"]["code"] == "INVALID_REQUEST"
    response = httpx.post(f"{webhook_cluster.url}/v1/inference", json={"model": "acme/tiny", "prompt": PROMPT, "webhook": "http://no-such-host.invalid/"}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["code"] == "WEBHOOK_UNRESOLVABLE"


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_hive_refuses_private_addresses_unless_allowed(redis_url, log_dir):
    port = processes.free_port()
    strict = processes.start(
        "hive-webhooks-strict",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", "hive:test-webhooks-strict"),
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "strict hive", (strict,))
        for webhook in ("http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://[::1]/x", "http://0.0.0.0/"):
            response = httpx.post(f"{url}/v1/inference", json={"model": "acme/tiny", "prompt": PROMPT, "webhook": webhook}, timeout=10)
            assert response.status_code == 422, (webhook, response.text)
            error = response.json()["error"]
            assert error["code"] == "WEBHOOK_ADDRESS_REFUSED" and error["details"][0]["field"] == "webhook"
    finally:
        strict.stop()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_hive_restarted_between_attempts_still_delivers(webhook_cluster, receiver):
    # The first attempt is told to come back in 3 s; the hive is replaced meanwhile.
    receiver.answer("/restart", (503, {"Retry-After": "3"}))
    job = submit(webhook_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=4, webhook=receiver.url("/restart"))
    webhook_of(webhook_cluster.url, job["job_id"], lambda s: s.get("webhook", {}).get("last_status") == 503 and s["webhook"]["state"] == "pending")
    stopped_at = webhook_cluster.restart_hive()
    first, second = receiver.wait_for("/restart", 2)
    assert second.at > stopped_at and second.at - first.at >= 2.9  # Retry-After honoured
    assert first.id == second.id and first.body == second.body
    second.verify(secret_of(webhook_cluster.url))
    final = webhook_of(webhook_cluster.url, job["job_id"], webhook_state("delivered"))
    assert final["webhook"]["attempts"] == 2


# Units: the guard, the signature, Retry-After.


@pytest.mark.unit
def test_refused_addresses():
    for address in ("127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                    "224.0.0.1", "240.0.0.1", "::1", "::", "fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"):
        assert refusal(address), address
    for address in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:1.1.1.1"):
        assert refusal(address) is None, address


@pytest.mark.unit
def test_resolve_checks_every_address_of_the_name():
    with pytest.raises(WebhookRefused) as refused:
        asyncio.run(resolve("http://localhost:8080/hook"))
    assert refused.value.code == "WEBHOOK_ADDRESS_REFUSED"
    assert asyncio.run(resolve("http://localhost:8080/hook", allow_private=True))


@pytest.mark.unit
def test_a_delivery_goes_to_the_address_that_was_checked(receiver):
    # The name is never resolved again: the request goes to the checked address, as that name.
    port = receiver.url("/").rsplit(":", 1)[1].split("/")[0]
    target, headers, extensions = pinned(f"http://hooks.example.com:{port}/pinned?a=1", "127.0.0.1")
    assert target == f"http://127.0.0.1:{port}/pinned?a=1" and extensions == {"sni_hostname": "hooks.example.com"}
    with httpx.Client(timeout=5) as client:
        assert client.post(target, headers=headers, content=b"{}", extensions=extensions).status_code == 200
    assert receiver.at("/pinned?a=1")[-1].headers["host"] == f"hooks.example.com:{port}"
    assert pinned("https://h.example/x", "2001:db8::1")[0] == "https://[2001:db8::1]/x"


@pytest.mark.unit
def test_a_delivery_to_a_refused_address_fails_without_retry():
    async def attempt():
        sender = WebhookSender(Settings(), aioredis.Redis(), clock=None, secrets=None)
        try:
            return await sender.send("http://127.0.0.1:9/hook", "msg_x", b"{}", "owner")
        finally:
            await sender.stop()

    outcome = asyncio.run(attempt())
    assert not outcome.delivered and not outcome.retry and outcome.error.startswith("WEBHOOK_ADDRESS_REFUSED")


@pytest.mark.unit
def test_the_signature_is_standard_webhooks():
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = b'{"state":"completed"}'
    headers = signed_headers(secret, "msg_1", time.time(), body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"state": "completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


@pytest.mark.unit
def test_retry_after():
    assert retry_after_s("7", 0) == 7 and retry_after_s(None, 0) == 0 and retry_after_s("soon", 0) == 0
    assert retry_after_s("99999999", 0) == 3600
    assert 9 <= retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0) <= 11
