"""The client libraries agents are built with (instructor, pydantic-ai, LangChain, the
OpenAI Agents SDK) run as their users run them, against a real hive and worker.

They are installed, at their current releases, in virtualenvs of their own rather than
Hive's, built on the first run and cached under ``~/.cache/hive-test-clients`` (delete it to
take newer releases). Each test runs one script of tests/clients/ with such a venv's python
and checks the JSON it prints. The model has random weights: every answer is valid because
of Hive's grammar alone (as in tests/test_tools.py), never because a client asked again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from filelock import FileLock

CLIENTS = Path(__file__).resolve().parent / "clients"
CACHE = Path.home() / ".cache" / "hive-test-clients"
MODEL = "acme/tiny-tools"
#: Each group of requirements in a venv of its own. instructor caps jiter below 0.15 while
#: openai from 3.4 on needs jiter 0.16: in one venv pip falls back to instructor 1.3 (2024)
#: with openai 1.x and an older Agents SDK and pydantic-ai. Apart, each gets its newest
#: release (instructor with the newest openai its cap allows, as `pip install instructor` does).
VENVS = {
    "instructor": ("instructor",),
    "agents": ("openai", "langchain-openai", "pydantic-ai-slim[openai]", "openai-agents"),
}
#: A fresh install of both venvs, side by side with pip's cache off, took 52 s here (2 minutes on a slower day).
INSTALL_TIMEOUT_S = 600
CLIENT_TIMEOUT_S = 120
#: What pip says when it cannot reach the package index: the tests skip rather than fail.
UNREACHABLE = ("NewConnectionError", "ConnectTimeout", "Max retries exceeded", "Temporary failure in name resolution", "Network is unreachable", "Read timed out", "ProxyError")

# The first test builds the venvs (cached afterwards); each script then runs under CLIENT_TIMEOUT_S.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(INSTALL_TIMEOUT_S + 2 * CLIENT_TIMEOUT_S)]


def client_venv(name: str, requirements: tuple[str, ...]) -> Path:
    """The python of the venv holding ``requirements``, keyed by them and the Python version;
    built when missing. ``installed.txt`` (pip freeze) is written last: a venv without it is
    an interrupted install, built again."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], requirements]).encode()).hexdigest()[:12]
    venv = CACHE / f"{name}-{key}"
    python = venv / "bin" / "python"
    installed = venv / "installed.txt"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{venv}.lock"):  # two test runs at once share one install
        if installed.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        command = [str(python), "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "30", *requirements]
        install = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if install.returncode != 0:
            if any(sign in install.stderr for sign in UNREACHABLE):
                pytest.skip(f"the package index cannot be reached to install {' '.join(requirements)}")
            pytest.fail(f"pip install {' '.join(requirements)} failed:\n{install.stderr[-4000:]}")
        freeze = subprocess.run([str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True, timeout=60)
        installed.write_text(freeze.stdout)
    return python


@pytest.fixture(scope="session")
def client_pythons() -> dict[str, Path]:
    """Each venv's python, the venvs built side by side."""
    with ThreadPoolExecutor(len(VENVS)) as pool:
        return dict(zip(VENVS, pool.map(lambda item: client_venv(*item), VENVS.items())))


def run_client(python: Path, url: str, script: str, *args: str) -> dict:
    """Run tests/clients/``script`` as a user would, outside Hive's venv; its last line of output."""
    # Nothing of this interpreter's environment leaks in: no PYTHONPATH, no OpenAI settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTHONPATH", "PYTHONHOME"))}
    env.update(HIVE_URL=url, HIVE_MODEL=MODEL)
    result = subprocess.run([str(python), str(CLIENTS / script), *args], env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.splitlines()[-1])


def assert_forecast(value: dict) -> None:
    """The Forecast model of the scripts: every field within its bounds."""
    assert isinstance(value["city"], str) and len(value["city"]) <= 12
    assert isinstance(value["temperature_c"], int) and -40 <= value["temperature_c"] <= 50
    assert value["sky"] in ("sunny", "cloudy", "rain")
    assert len(value["alerts"]) <= 2 and all(isinstance(a, str) and len(a) <= 10 for a in value["alerts"])


def assert_weather_arguments(arguments: dict) -> None:
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12


def test_instructor_in_tools_mode_returns_a_validated_model(client_pythons, cluster):
    result = run_client(client_pythons["instructor"], cluster.url, "instructor_tools.py")
    assert result["type"] == "Forecast"
    assert_forecast(result["value"])
    assert result["value"]["unit"] in ("celsius", "fahrenheit")


def test_a_pydantic_ai_agent_returns_its_output_type(client_pythons, cluster):
    result = run_client(client_pythons["agents"], cluster.url, "pydantic_ai_output.py")
    assert result["type"] == "Forecast"
    assert_forecast(result["value"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_is_a_validated_model(client_pythons, cluster, method):
    result = run_client(client_pythons["agents"], cluster.url, "langchain_openai_tools.py", method)
    assert result["type"] == "Forecast"
    assert_forecast(result["value"])


@pytest.mark.parametrize("tool_choice", ["any", "named"])
def test_langchain_bound_tool_is_called_with_valid_arguments(client_pythons, cluster, tool_choice):
    result = run_client(client_pythons["agents"], cluster.url, "langchain_openai_tools.py", f"bind_tools_{tool_choice}")
    assert result["type"] == "AIMessage" and result["invalid_tool_calls"] == []
    # Parallel calls are allowed: at least one, every one valid.
    assert result["tool_calls"] and all(call["name"] == "get_weather" and call["id"].startswith("call_") for call in result["tool_calls"])
    for call in result["tool_calls"]:
        assert_weather_arguments(call["args"])


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_an_openai_agents_sdk_run_calls_its_tool_then_answers(client_pythons, cluster, api):
    result = run_client(client_pythons["agents"], cluster.url, "openai_agents_tool.py", api)
    assert result["calls"], result
    for arguments in result["calls"]:
        assert_weather_arguments(arguments)
    assert result["items"][:2] == ["tool_call_item", "tool_call_output_item"] and result["items"][-1] == "message_output_item"
    assert result["final_output_type"] == "Report"
    report = result["final_output"]
    assert set(report) == {"city", "summary"} and len(report["city"]) <= 12 and len(report["summary"]) <= 20
