"""The docs cannot drift from the code: every file in docs/examples/ runs, as a user would
run it, against a real hive and worker; the listings of those files in the docs are the
files themselves; and every relative link in README.md and docs/ reaches a file and a
heading that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sse import status

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted(path for path in (DOCS / "examples").iterdir() if path.suffix in (".sh", ".py"))
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
#: The demo model: the examples' default, and one the test cluster's hub serves.
MODEL = "hive-demo/tiny-llama"


def run_example(path: Path, url: str) -> subprocess.CompletedProcess:
    command = ["bash", str(path)] if path.suffix == ".sh" else [sys.executable, str(path)]
    env = {name: value for name, value in os.environ.items() if name != "HIVE_API_KEY"}
    env.update(HIVE_URL=url, HIVE_MODEL=MODEL, PYTHONWARNINGS="error")
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=100)


def ids_in_order(ids: list[int]) -> bool:
    """Every event exactly once, in order: 1, 2, 3, …"""
    return ids == list(range(1, len(ids) + 1))


def check_submit_and_stream_sh(result: subprocess.CompletedProcess, url: str) -> None:
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert "event: token" in lines and "event: end" in lines
    assert ids_in_order([int(line.removeprefix("id: ")) for line in lines if line.startswith("id: ")])


def check_submit_and_stream_py(result: subprocess.CompletedProcess, url: str) -> None:
    [job_id] = re.findall(r"^job (\w+),", result.stderr, re.MULTILINE)
    final = status(url, job_id)
    assert final["state"] == "completed" and final["tokens_out"] > 0
    # The tokens printed as they arrived make up the job's whole output.
    assert result.stdout == final["output"] != ""
    assert f"{final['tokens_out']} tokens" in result.stderr and "stop: " in result.stderr


def check_openai_client_py(result: subprocess.CompletedProcess, url: str) -> None:
    match = re.fullmatch(r"streamed: (.+)\nnot streamed: (.+)\nfinish_reason: (\w+), usage: (\d+) \+ (\d+) tokens, job (\w+)\n", result.stdout, re.DOTALL)
    assert match, result.stdout
    streamed, not_streamed, finish_reason, _, completion_tokens, job_id = match.groups()
    assert streamed.strip() and not_streamed.strip()
    assert finish_reason in ("stop", "length")
    final = status(url, job_id)
    assert final["output"] == not_streamed and final["tokens_out"] == int(completion_tokens)


def check_resume_stream_py(result: subprocess.CompletedProcess, url: str) -> None:
    lines = result.stdout.splitlines()
    assert lines[-1] == "[DONE]"
    events = [line.split() for line in lines[:-1]]
    # Three events on the first connection, the rest after reconnecting: none twice, none missing.
    assert ids_in_order([int(event_id) for event_id, _ in events]) and len(events) > 3
    assert events[-1][1] == "end"
    assert "reconnecting with Last-Event-ID: 3" in result.stderr


CHECKS = {
    "submit_and_stream.sh": check_submit_and_stream_sh,
    "submit_and_stream.py": check_submit_and_stream_py,
    "openai_client.py": check_openai_client_py,
    "resume_stream.py": check_resume_stream_py,
}


@pytest.mark.e2e
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_against_a_real_hive(cluster, example):
    result = run_example(example, cluster.url)
    assert result.returncode == 0, f"{example.name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    CHECKS[example.name](result, cluster.url)


@pytest.mark.unit
def test_every_example_has_its_check_and_a_page_that_shows_it():
    assert sorted(CHECKS) == sorted(path.name for path in EXAMPLES)
    text = "\n".join(page.read_text() for page in PAGES)
    for example in EXAMPLES:
        assert f"examples/{example.name}" in text, f"no page links docs/examples/{example.name}"


def fenced_blocks_after_markers(text: str) -> list[tuple[str, str]]:
    """The code blocks that follow an ``<!-- example: NAME -->`` marker: (NAME, content)."""
    pattern = re.compile(r"<!-- example: (\S+) -->\n```[^\n]*\n(.*?)```\n", re.DOTALL)
    return pattern.findall(text)


@pytest.mark.unit
def test_listed_examples_are_the_files_themselves():
    listed = 0
    for page in PAGES:
        text = page.read_text()
        markers = strip_code(text).count("<!-- example: ")
        blocks = fenced_blocks_after_markers(text)
        assert len(blocks) == markers, f"{page.name}: a marker without a code block right after it"
        for name, content in blocks:
            assert content == (DOCS / "examples" / name).read_text(), f"{page.name} shows an old {name}"
            listed += 1
    assert listed


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", strip_fences(text), re.MULTILINE):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def strip_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def strip_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", strip_fences(text))


@pytest.mark.unit
@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_reach_a_file_and_a_heading(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", strip_code(text)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"
