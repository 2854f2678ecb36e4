"""API keys, ownership and signed stream URLs, against a real `hive serve`."""

from __future__ import annotations

import httpx
import pytest

from tests import processes

pytestmark = pytest.mark.e2e

KEY_A, KEY_B, ADMIN = "key-a-0123456789", "key-b-0123456789", "key-admin-0123456789"
BODY = {"model": "acme/tiny", "prompt": "hi"}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secured_hive(redis_url, log_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# team keys\n{KEY_A}\n{KEY_B}\n")
    port = processes.free_port()
    proc = processes.start(
        "hive-secured",
        processes.hive_command("serve", "--redis-url", redis_url, "--port", str(port), "--queue", "hive:test-secured"),
        log_dir,
        env={"HIVE_API_KEYS": f"@{keys_file}", "HIVE_ADMIN_KEYS": ADMIN},
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "secured hive", (proc,))
    yield url, proc
    proc.stop()


def test_health_is_open_and_everything_else_wants_a_key(secured_hive):
    url, _ = secured_hive
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, bearer("wrong"), {"Authorization": KEY_A}, {"Authorization": "Basic xyz"}):
        response = httpx.post(f"{url}/v1/inference", json=BODY, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "UNAUTHORIZED"
        assert response.headers["www-authenticate"] == "Bearer"
    job_path = f"/v1/inference/{'0' * 32}"
    for method, path in (("GET", job_path), ("GET", job_path + "/stream"), ("DELETE", job_path)):
        assert httpx.request(method, url + path).status_code == 401


def test_a_job_is_visible_only_to_its_key_and_admins(secured_hive):
    url, _ = secured_hive
    job = httpx.post(f"{url}/v1/inference", json=BODY, headers=bearer(KEY_A)).json()
    status_url = url + job["status_url"]
    assert httpx.get(status_url, headers=bearer(KEY_A)).status_code == 200
    assert httpx.get(status_url, headers=bearer(ADMIN)).status_code == 200
    other = httpx.get(status_url, headers=bearer(KEY_B))
    assert other.status_code == 404 and other.json()["error"]["code"] == "JOB_NOT_FOUND"
    stream_path = job["status_url"] + "/stream"
    assert httpx.get(url + stream_path, headers=bearer(KEY_B)).status_code == 404
    assert httpx.delete(status_url, headers=bearer(KEY_B)).status_code == 404
    assert httpx.delete(status_url, headers=bearer(KEY_A)).status_code == 200


def test_the_sse_url_token_lets_a_headerless_client_follow_only_that_job(secured_hive):
    url, _ = secured_hive
    job = httpx.post(f"{url}/v1/inference", json=BODY, headers=bearer(KEY_A)).json()
    assert "?token=" in job["sse_url"]
    with httpx.stream("GET", url + job["sse_url"], timeout=10) as response:  # no Authorization header
        assert response.status_code == 200
        assert next(response.iter_lines()) == "id: 1"
    other = httpx.post(f"{url}/v1/inference", json=BODY, headers=bearer(KEY_B)).json()
    token = job["sse_url"].split("token=")[1]
    stolen = httpx.get(f"{url}/v1/inference/{other['job_id']}/stream?token={token}")
    assert stolen.status_code == 401 and stolen.json()["error"]["code"] == "INVALID_TOKEN"
    expires, signature = token.split(".")
    forged = httpx.get(f"{url}{job['status_url']}/stream?token={int(expires) + 3600}.{signature}")
    assert forged.status_code == 401


def test_keys_never_reach_the_log(secured_hive):
    url, proc = secured_hive
    httpx.get(f"{url}/health", headers=bearer(KEY_A))
    log = proc.log()
    assert KEY_A not in log and KEY_B not in log and ADMIN not in log


def test_without_keys_the_hive_refuses_to_listen_beyond_loopback():
    result = processes.run_hive("serve", "--host", "0.0.0.0", "--port", str(processes.free_port()))
    assert result.returncode == 2 and "loopback" in result.stderr and "Traceback" not in result.stderr


def test_fleet_endpoints_want_a_key_and_changes_want_an_admin(secured_hive):
    url, _ = secured_hive
    for method, path in (("GET", "/v1/workers"), ("GET", "/v1/models"), ("POST", "/v1/models/pull"), ("DELETE", "/v1/models/acme/tiny")):
        assert httpx.request(method, url + path).status_code == 401
    assert httpx.get(f"{url}/v1/workers", headers=bearer(KEY_A)).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=bearer(KEY_A)).json()["object"] == "list"
    pull = httpx.post(f"{url}/v1/models/pull", json={"model": "acme/tiny"}, headers=bearer(KEY_A))
    assert pull.status_code == 403 and pull.json()["error"]["code"] == "FORBIDDEN"
    assert httpx.delete(f"{url}/v1/models/acme/tiny", headers=bearer(KEY_A)).status_code == 403
    accepted = httpx.post(f"{url}/v1/models/pull", json={"model": "acme/tiny"}, headers=bearer(ADMIN))
    assert accepted.status_code == 202
    assert httpx.delete(url + accepted.json()["status_url"], headers=bearer(ADMIN)).status_code == 200
    assert httpx.delete(f"{url}/v1/models/acme/tiny", headers=bearer(ADMIN)).status_code == 404  # no worker has it
