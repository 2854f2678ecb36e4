"""The web console at ``/`` in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) against a real hive and worker: a cold
model's download and loading bars, tokens arriving one by one, the end status,
the workers table, Stop, API keys, and a stream resumed after the hive restarted.
Waits are event-driven: a MutationObserver in the page answers as soon as the DOM
meets a condition. The screenshot of a finished job is kept in the tests' log dir
and in ``test-artifacts/console.png``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests import processes
from tests.sse import run_job

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="headless browser test: chromium and chromedriver not installed (apt-get install chromium chromium-driver)",
    ),
]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
#: A copy of acme/tiny that no other test uses, so that it is cold on the slow
#: cluster's worker and in the shared hub cache: the page shows download and loading.
MODEL = "acme/tiny-console"
PROMPT = "The quick brown fox"
KEY = "key-console-0123456789"


@pytest.fixture(scope="module")
def browser(log_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, log_output=str(log_dir / "chromedriver.log")))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def cold_model(model_root: Path) -> str:
    # The test hub reads its folder on every request: a copy made now is served.
    shutil.copytree(model_root / "acme" / "tiny", model_root / MODEL)
    return MODEL


@pytest.fixture()
def warm_model(slow_cluster) -> str:
    """acme/tiny, loaded on the slow cluster's worker by a job through the API."""
    _, received = run_job(slow_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=1)
    assert received[-2].event == "end"
    return "acme/tiny"


@pytest.fixture(scope="module")
def keyed_hive(slow_cluster, log_dir):
    """A second `hive serve`, with an API key, on the slow cluster's queue: its worker serves both."""
    port = processes.free_port()
    proc = processes.start(
        "hive-console-keyed",
        processes.hive_command("serve", "--redis-url", slow_cluster.redis_url, "--port", str(port), "--queue", slow_cluster.queue),
        log_dir,
        env={"HIVE_API_KEYS": KEY},
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url).get("workers", 0) >= 1, 30, "keyed hive", (proc,))
    yield url
    proc.stop()


def wait_for(driver, condition: str, timeout: float = 30):
    """Waits until the JavaScript expression ``condition`` is truthy, checking it on
    every change to the page's DOM (no polling); returns its value."""
    driver.set_script_timeout(timeout)
    script = f"""
        const done = arguments[arguments.length - 1];
        const check = () => {{
            const value = ({condition});
            if (value) {{ observer.disconnect(); done(value); }}
        }};
        const observer = new MutationObserver(check);
        observer.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
        check();
    """
    try:
        return driver.execute_async_script(script)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"not within {timeout} s: {condition} (page status: {status!r})") from None


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def submit(driver, model: str, max_tokens: int, prompt: str = PROMPT) -> None:
    fill(driver, "model", model)
    fill(driver, "max-tokens", str(max_tokens))
    fill(driver, "temperature", "0")
    fill(driver, "prompt", prompt)
    driver.find_element(By.ID, "run").click()


def phase(driver) -> str:
    return driver.find_element(By.ID, "job").get_attribute("data-phase")


FINISHED = "['completed', 'failed', 'cancelled'].includes(document.getElementById('job').dataset.phase)"

#: Records, from the page itself, each change of the output and of the progress labels.
RECORD_CHANGES = """
window.changes = {output: [], download: [], loading: []};
for (const [name, id] of [["output", "output"], ["download", "download-label"], ["loading", "loading-label"]]) {
    const element = document.getElementById(id);
    new MutationObserver(() => window.changes[name].push([performance.now(), element.textContent]))
        .observe(element, {subtree: true, childList: true, characterData: true});
}
"""


def save_screenshot(driver, log_dir: Path) -> Path:
    shot = log_dir / "console.png"
    assert driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # artifacts, never committed
    shutil.copyfile(shot, ARTIFACTS / "console.png")
    return shot


def test_console_streams_a_cold_model_from_download_to_end(browser, slow_cluster, cold_model, log_dir):
    browser.get(f"{slow_cluster.url}/")
    worker_ids = [w["id"] for w in httpx.get(f"{slow_cluster.url}/v1/workers").json()["workers"]]
    assert worker_ids
    wait_for(browser, f"document.getElementById('workers').textContent.includes({worker_ids[0]!r})")
    assert re.fullmatch(r"\d+", text(browser, "queue-depth"))
    assert re.search(r"\d+ workers? · queue \d+", text(browser, "health"))

    browser.execute_script(RECORD_CHANGES)
    submit(browser, cold_model, max_tokens=16)
    wait_for(browser, FINISHED, timeout=60)
    assert phase(browser) == "completed", text(browser, "status")
    assert re.fullmatch(r"16 tokens · first token \d+ ms · \d+ tokens/s · stop: max_tokens", text(browser, "status"))

    # The page shows exactly what the job produced.
    job_id = text(browser, "job-id").removeprefix("job ")
    record = httpx.get(f"{slow_cluster.url}/v1/inference/{job_id}").json()
    assert record["state"] == "completed" and record["tokens_out"] == 16
    assert browser.execute_script("return document.getElementById('output').textContent") == record["output"]

    # Download and loading bars full, reached event by event.
    changes = browser.execute_script("return window.changes")
    for bar in ("download", "loading"):
        bar_element = browser.find_element(By.ID, bar)
        assert bar_element.get_attribute("value") == bar_element.get_attribute("max")
    downloads = [label for _, label in changes["download"] if label != "–"]
    total = re.match(r"([\d.]+)/([\d.]+) MiB · file (\d+)/(\d+)$", downloads[-1])
    assert total and total[1] == total[2] and total[3] == total[4], downloads
    loading = [label for _, label in changes["loading"] if label != "–"]
    assert [re.findall(r"^layer (\d)/4 · [\d.]+ MB on cpu$", label) for label in loading] == [["1"], ["2"], ["3"], ["4"]], loading

    # Tokens arrived one by one (100 ms apart on this worker), not all at once.
    growth = [(at, len(out)) for at, out in changes["output"] if out]
    lengths = [n for _, n in growth]
    assert lengths == sorted(lengths) and len(set(lengths)) >= 8, growth
    assert growth[-1][0] - growth[0][0] >= 700, growth

    wait_for(browser, f"document.getElementById('workers').textContent.includes({cold_model!r})")
    save_screenshot(browser, log_dir)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_stop_cancels_a_running_job_on_a_warm_model(browser, slow_cluster, warm_model):
    browser.get(f"{slow_cluster.url}/")
    submit(browser, warm_model, max_tokens=200)
    wait_for(browser, "/ · [3-9]\\d* tokens$/.test(document.getElementById('status').textContent)")
    assert text(browser, "loading-label") == "already loaded (warm)"
    browser.find_element(By.ID, "stop").click()
    wait_for(browser, FINISHED)
    assert phase(browser) == "cancelled"
    assert text(browser, "status").endswith("stop: cancelled")
    assert not browser.find_element(By.ID, "stop").is_enabled()


def test_the_page_needs_no_key_and_sends_the_one_typed_in(browser, slow_cluster, keyed_hive, warm_model):
    page = httpx.get(f"{keyed_hive}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    browser.get(f"{keyed_hive}/")
    wait_for(browser, "document.getElementById('workers').textContent.includes('API key is needed')")
    assert browser.find_element(By.ID, "model").get_attribute("value") == "hive-demo/tiny-llama"
    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys(KEY, Keys.TAB)  # a change event: saved, then the lists are fetched with it
    worker_id = httpx.get(f"{slow_cluster.url}/v1/workers").json()["workers"][0]["id"]
    wait_for(browser, f"document.getElementById('workers').textContent.includes({worker_id!r})")
    browser.refresh()
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY

    # The stream itself is opened by EventSource with the signed token of the sse_url.
    submit(browser, warm_model, max_tokens=4)
    wait_for(browser, FINISHED)
    assert phase(browser) == "completed", text(browser, "status")
    assert text(browser, "status").startswith("4 tokens")


def test_a_stream_ended_by_the_hive_resumes_where_it_was(browser, slow_cluster, warm_model, log_dir):
    """SIGTERM on the hive ends the page's stream with an id-less SHUTTING_DOWN error;
    the page keeps its EventSource, which reconnects with Last-Event-ID once a hive
    answers on that address again, and the job's text arrives whole, nothing twice."""
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"

    def start_hive(name: str) -> processes.Proc:
        command = processes.hive_command("serve", "--redis-url", slow_cluster.redis_url, "--port", str(port), "--queue", slow_cluster.queue)
        proc = processes.start(name, command, log_dir)
        processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, name, (proc,))
        return proc

    first = start_hive("hive-console-first")
    try:
        browser.get(f"{url}/")
        submit(browser, warm_model, max_tokens=40)
        wait_for(browser, "/ · ([5-9]|\\d\\d+) tokens$/.test(document.getElementById('status').textContent)")
    finally:
        first.stop()
    wait_for(browser, "document.getElementById('status').textContent.includes('(SHUTTING_DOWN); resuming')")
    second = start_hive("hive-console-second")
    try:
        wait_for(browser, FINISHED, timeout=60)
        assert phase(browser) == "completed", text(browser, "status")
        record = httpx.get(f"{url}/v1/inference/{text(browser, 'job-id').removeprefix('job ')}").json()
        assert record["tokens_out"] == 40
        assert browser.execute_script("return document.getElementById('output').textContent") == record["output"]
    finally:
        second.stop()
