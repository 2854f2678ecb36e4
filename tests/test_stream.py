"""The core path end to end: POST → sse_url → download, loading, tokens, [DONE],
through a real redis-server, ``hive serve`` and ``hive worker`` processes."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.sse import events, follow, run_job, status, submit

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


def types(received) -> list[str]:
    return [r.event for r in events(received)]


def assert_well_formed(received) -> None:
    """Ids 1, 2, 3, ...; every data is one JSON object whose "event" repeats the type; [DONE] last."""
    assert received[-1].done
    body = events(received)
    assert [int(r.id) for r in body] == list(range(int(body[0].id), int(body[0].id) + len(body)))
    for r in body:
        assert r.json()["event"] == r.event


def test_submit_answers_202_with_urls_and_location(cluster):
    response = httpx.post(f"{cluster.url}/v1/inference", json={"model": "acme/tiny", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 202
    job = response.json()
    assert job["sse_url"] == f"/v1/inference/{job['job_id']}/stream"
    assert job["status_url"] == f"/v1/inference/{job['job_id']}"
    assert response.headers["location"] == job["status_url"]
    assert follow(cluster.url, job["sse_url"])[-1].done


def test_cold_job_streams_every_phase_in_order(cluster, model_root: Path):
    job, received = run_job(cluster.url, model="acme/tiny-order", prompt=PROMPT, max_tokens=12, temperature=0)
    assert_well_formed(received)
    seen = types(received)
    # queued, download..., loading..., ready, started, token..., end
    assert seen[0] == "queued"
    n_download, n_loading = seen.count("download"), seen.count("loading")
    assert n_download >= 1 and n_loading == 4
    assert seen[1 : 1 + n_download] == ["download"] * n_download
    assert seen[1 + n_download : 1 + n_download + 4] == ["loading"] * 4
    rest = seen[1 + n_download + 4 :]
    assert rest[:2] == ["ready", "started"]
    assert rest[2:-1] == ["token"] * 12 and rest[-1] == "end"

    body = {r.event: r.json() for r in events(received)}
    assert body["ready"] == {"event": "ready", "stage": "ready", "load_ms": body["ready"]["load_ms"], "warm": False}
    assert body["started"]["job_id"] == job["job_id"] and body["started"]["model"] == "acme/tiny-order"
    end = body["end"]
    assert end["tokens_out"] == 12 and end["stop_reason"] == "max_tokens"
    assert end["ttft_ms"] > 0 and end["decode_time_ms"] > 0
    tokens = [r.json() for r in events(received) if r.event == "token"]
    assert [t["i"] for t in tokens] == list(range(12))

    final = status(cluster.url, job["job_id"])
    assert final["state"] == "completed"
    assert final["output"] == "".join(t["t"] for t in tokens)
    assert final["tokens_out"] == 12 and final["worker"] == body["started"]["worker"]
    assert final["timings"]["load_ms"] > 0 and final["timings"]["queue_ms"] >= 0


def test_download_and_loading_report_real_growing_numbers(cluster, model_root: Path):
    job, received = run_job(cluster.url, model="acme/big", prompt=PROMPT, max_tokens=2)
    assert_well_formed(received)
    downloads = [r.json() for r in events(received) if r.event == "download"]
    files = sorted((model_root / "acme" / "big").iterdir())
    total = sum(f.stat().st_size for f in files)
    assert all(d["bytes_total"] == total and d["files_total"] == len(files) for d in downloads)
    done = [d["bytes_downloaded"] for d in downloads]
    assert done == sorted(done) and done[-1] == total
    assert downloads[-1]["files_done"] == len(files)
    # The shards are several MB on a throttled link: progress arrives within a file.
    largest = max(files, key=lambda f: f.stat().st_size)
    within = [d for d in downloads if d["file"] == largest.name and 0 < d["bytes_downloaded"] < total]
    assert len(within) >= 2

    loading = [r.json() for r in events(received) if r.event == "loading"]
    assert [m["layers_loaded"] for m in loading] == [1, 2, 3, 4]
    assert all(m["layers_total"] == 4 and m["device"] == "cpu" and m["stage"] == "loading_to_vram" for m in loading)
    vram = [m["vram_mb"] for m in loading]
    assert vram == sorted(vram) and vram[0] > 0
    # float32 weights placed so far, after the last layer: everything but the final norm.
    weights_mb = sum(f.stat().st_size for f in files if f.suffix == ".safetensors") / 2**20
    assert weights_mb * 0.9 < vram[-1] <= weights_mb * 1.01


def test_warm_second_job_has_no_download_or_loading(cluster):
    _, first = run_job(cluster.url, model="acme/tiny-warm", prompt=PROMPT, max_tokens=3, temperature=0)
    assert "download" in types(first)
    _, second = run_job(cluster.url, model="acme/tiny-warm", prompt=PROMPT, max_tokens=3, temperature=0)
    assert types(second) == ["queued", "ready", "started", "token", "token", "token", "end"]
    ready = next(r.json() for r in events(second) if r.event == "ready")
    assert ready["warm"] is True


def test_cached_model_sends_one_cached_download_event(cluster, slow_cluster):
    # The slow cluster's worker has never loaded acme/tiny-cli, but the fast one
    # downloaded it into the same hub cache.
    run_job(cluster.url, model="acme/tiny-cli", prompt=PROMPT, max_tokens=1)
    _, received = run_job(slow_cluster.url, model="acme/tiny-cli", prompt=PROMPT, max_tokens=1)
    downloads = [r.json() for r in events(received) if r.event == "download"]
    assert len(downloads) == 1 and downloads[0]["cached"] is True
    assert downloads[0]["bytes_downloaded"] == downloads[0]["bytes_total"] > 0


def test_late_client_gets_the_full_replay(cluster):
    job, live = run_job(cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    late = follow(cluster.url, job["sse_url"])
    assert [(r.id, r.event, r.data) for r in late] == [(r.id, r.event, r.data) for r in live]
    assert late[0].event == "queued" and late[0].id == "1"


def test_last_event_id_resumes_exactly_after_that_event(cluster):
    job, full = run_job(cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    body = events(full)
    for cut in (1, 4, len(body) - 1, len(body)):
        resumed = follow(cluster.url, job["sse_url"], last_event_id=body[cut - 1].id)
        assert [(r.id, r.data) for r in events(resumed)] == [(r.id, r.data) for r in body[cut:]]
        assert resumed[-1].done


def test_reconnect_mid_stream_loses_and_repeats_nothing(slow_cluster):
    job = submit(slow_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    first = follow(slow_cluster.url, job["sse_url"], limit=3)
    rest = follow(slow_cluster.url, job["sse_url"], last_event_id=first[-1].id)
    combined = first + rest
    assert_well_formed(combined)
    assert int(combined[0].id) == 1
    assert types(combined).count("token") == 10


def test_concurrent_followers_see_identical_streams(slow_cluster):
    job = submit(slow_cluster.url, model="acme/tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    results: dict[int, list] = {}

    def reader(k: int) -> None:
        results[k] = follow(slow_cluster.url, job["sse_url"])

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    streams = [[(r.id, r.event, r.data) for r in results[k]] for k in range(3)]
    assert streams[0] == streams[1] == streams[2]
    assert streams[0][-1][2] == "[DONE]" and types(results[0]).count("token") == 8


def test_tokens_reach_the_client_as_they_are_generated(slow_cluster):
    # The slow worker pauses 100 ms after each token: 20 tokens take ~2 s to make.
    # Greedy: the random model's tokens are fixed, and they hold no end-of-sequence.
    job = submit(slow_cluster.url, model="acme/tiny-slow", prompt=PROMPT, max_tokens=20, temperature=0)
    received = follow(slow_cluster.url, job["sse_url"])
    tokens = [r for r in received if r.event == "token"]
    assert len(tokens) == 20
    spread = tokens[-1].at - tokens[0].at
    # Faked streaming (all computed, then sent) would deliver them within a few ms.
    assert spread > 1.0, f"tokens arrived within {spread:.3f} s: not streamed"
    end = next(r.json() for r in received if r.event == "end")
    assert end["decode_time_ms"] > 1500


def test_seed_makes_sampling_reproducible(cluster):
    body = dict(model="acme/tiny", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    outputs = [status(cluster.url, run_job(cluster.url, **body)[0]["job_id"])["output"] for _ in range(2)]
    assert outputs[0] == outputs[1]
    other = status(cluster.url, run_job(cluster.url, **{**body, "seed": 99})[0]["job_id"])["output"]
    assert other != outputs[0]


def test_stop_sequence_cuts_the_output_and_is_never_streamed(cluster):
    body = dict(model="acme/tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    full = status(cluster.url, run_job(cluster.url, **body)[0]["job_id"])["output"]
    stop = full[6:9]
    assert stop
    job, received = run_job(cluster.url, **body, stop=[stop])
    streamed = "".join(r.json()["t"] for r in received if r.event == "token")
    assert streamed == full[: full.find(stop)]
    assert stop not in streamed
    end = next(r.json() for r in received if r.event == "end")
    assert end["stop_reason"] == "stop_sequence"
    assert status(cluster.url, job["job_id"])["output"] == streamed


def test_messages_use_the_chat_template(cluster):
    job, received = run_job(
        cluster.url, model="acme/tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
    )
    assert types(received)[-1] == "end"
    assert status(cluster.url, job["job_id"])["prompt_tokens"] > 3


def test_unknown_model_ends_with_model_not_found(cluster):
    job, received = run_job(cluster.url, model="acme/does-not-exist", prompt=PROMPT)
    assert_well_formed(received)
    error = events(received)[-1]
    assert error.event == "error" and error.json()["code"] == "MODEL_NOT_FOUND"
    final = status(cluster.url, job["job_id"])
    assert final["state"] == "failed" and final["error"]["code"] == "MODEL_NOT_FOUND"


def test_prompt_longer_than_the_context_fails_before_generation(cluster):
    # The tiny models have a 2048-token context; this prompt is longer.
    job, received = run_job(cluster.url, model="acme/tiny", prompt="q z " * 3000, max_tokens=4)
    assert_well_formed(received)
    assert "token" not in types(received)
    error = events(received)[-1]
    assert error.event == "error" and error.json()["code"] == "PROMPT_TOO_LONG"
    assert "2048" in error.json()["message"]
