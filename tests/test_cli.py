"""The ``hive`` command as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import processes

pytestmark = pytest.mark.e2e


hive = processes.run_hive


def test_run_prints_tokens_to_stdout_and_progress_to_stderr(cluster):
    result = hive("run", "--url", cluster.url, "--model", "acme/tiny", "--max-tokens", "6", "--temperature", "0", "Hello")
    assert result.returncode == 0, result.stderr
    assert "6 tokens" in result.stderr and "stop: max_tokens" in result.stderr
    # stdout holds the generated text only: the same text the job's status reports.
    import httpx

    job_id = next(line.split()[-1] for line in result.stderr.splitlines() if line.startswith("job "))
    output = httpx.get(f"{cluster.url}/v1/inference/{job_id}").json()["output"]
    assert result.stdout == output + "\n"


def test_run_reads_the_url_from_the_environment(cluster):
    result = hive("run", "--model", "acme/tiny", "--max-tokens", "2", "--temperature", "0", "hi", env={"HIVE_URL": cluster.url})
    assert result.returncode == 0, result.stderr


def test_run_rejected_request_exits_2_with_the_reason(cluster):
    result = hive("run", "--url", cluster.url, "--model", "not-a-repo-id", "hi")
    assert result.returncode == 2
    assert "INVALID_REQUEST" in result.stderr and "Traceback" not in result.stderr


def test_run_failed_job_exits_1(cluster):
    result = hive("run", "--url", cluster.url, "--model", "acme/missing", "hi")
    assert result.returncode == 1
    assert "MODEL_NOT_FOUND" in result.stderr and "Traceback" not in result.stderr


def test_run_without_a_hive_exits_3():
    result = hive("run", "--url", f"http://127.0.0.1:{processes.free_port()}", "hi")
    assert result.returncode == 3
    assert "cannot reach the hive" in result.stderr and "Traceback" not in result.stderr


def test_bad_option_value_is_a_usage_error():
    result = hive("run", "--max-tokens", "0", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_up_answers_a_prompt_with_no_redis_server_installed(tmp_path: Path):
    """The quickstart: no redis-server on PATH (embedded Redis), no network, the
    built-in demo model downloaded from the hive's own hub endpoint. Every warning
    shown (PYTHONWARNINGS=default: deprecations, unclosed connections), in the
    hive and in its worker: the demo prints none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "PYTHONWARNINGS": "default"}
    port = str(processes.free_port())
    result = hive("up", "--port", port, "--max-tokens", "8", "--temperature", "0", "--run", "Hello", env=env, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded in-memory Redis" in result.stderr
    assert "download" in result.stderr and "loading" in result.stderr
    assert "8 tokens" in result.stderr
    assert result.stdout.strip() != ""
    assert "Warning" not in result.stderr, result.stderr[-3000:]
