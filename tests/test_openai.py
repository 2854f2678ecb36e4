"""The OpenAI-compatible API, driven by the official ``openai`` client against a
real hive and worker."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests import processes
from tests.sse import status

pytestmark = pytest.mark.e2e

MODEL = "acme/tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
PROMPT = "The quick brown fox"
KEY_A, KEY_B = "openai-key-a-0123456789", "openai-key-b-0123456789"


def client_for(url: str, api_key: str = "unused") -> openai.OpenAI:
    # No retries: a test sees the first answer, not a second job.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(cluster):
    with client_for(cluster.url) as c:
        yield c


def job_id_of(completion_id: str) -> str:
    return completion_id.split("-", 1)[1]


def assert_usage_is_the_jobs(url: str, completion_id: str, usage) -> dict:
    final = status(url, job_id_of(completion_id))
    assert usage.prompt_tokens == final["prompt_tokens"] > 0
    assert usage.completion_tokens == final["tokens_out"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    return final


def test_chat_completion(cluster, client):
    completion = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    final = assert_usage_is_the_jobs(cluster.url, completion.id, completion.usage)
    assert final["state"] == "completed" and choice.message.content == final["output"]
    # Text content parts and the developer role read as a string and the system role.
    parts = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    same = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0)
    assert same.choices[0].message.content == choice.message.content


def test_chat_completion_streamed(cluster, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choices, usage_chunk = chunks
    assert usage_chunk.choices == [] and all(c.usage is None for c in with_choices)
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    final = assert_usage_is_the_jobs(cluster.url, chunks[0].id, usage_chunk.usage)
    assert text == final["output"]
    # Same request, not streamed: the same text (greedy).
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text


def test_completion_both_ways(cluster, client):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    [choice] = completion.choices
    final = assert_usage_is_the_jobs(cluster.url, completion.id, completion.usage)
    assert choice.text == final["output"]

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_the_raw_stream_is_openais_format(cluster):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        job_id = response.headers["x-hive-job-id"]
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines), lines  # no id: or event: lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{job_id}"}


def test_errors_are_openais_objects(cluster):
    response = httpx.post(f"{cluster.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "top_p": 0}, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert {k: error[k] for k in ("type", "param", "code")} == {
        "type": "invalid_request_error", "param": "top_p", "code": "INVALID_REQUEST"
    }
    assert "top_p" in error["message"]
    response = httpx.post(f"{cluster.url}/v1/completions", content=b"{not json", timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_JSON"


def test_max_tokens_ends_with_length(cluster, client):
    # Greedy, this prompt runs past 8 tokens before any end-of-sequence (see test_cancel).
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3
    assert status(cluster.url, job_id_of(completion.id))["stop_reason"] == "max_tokens"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2, temperature=0)
    assert chat.usage.completion_tokens <= 2
    assert status(cluster.url, job_id_of(chat.id))["max_tokens"] == 2


def test_stop_sequences(cluster, client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    assert len(full) >= 8, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    for as_given in (stop, [stop, "never in the output ☃"]):
        completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=as_given)
        assert completion.choices[0].text == expected
        assert completion.choices[0].finish_reason == "stop"
        assert status(cluster.url, job_id_of(completion.id))["stop_reason"] == "stop_sequence"


def test_same_seed_same_text(client):
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
        )
        return completion.choices[0].message.content

    first = sample(42)
    assert sample(42) == first
    assert sample(43) != first  # random weights: 16 sampled tokens never repeat by chance


def test_models_list(client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    models = client.models.list()
    assert MODEL in {m.id for m in models.data}
    assert all(m.object == "model" for m in models.data)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 17}, "n"),
        ({"temperature": 9.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "not a repo id"}, "model"),
    ],
)
def test_a_bad_request_is_a_bad_request_error(client, fields, param):
    request = {"model": MODEL, "messages": CHAT, **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    assert raised.value.status_code == 400 and raised.value.param == param
    assert raised.value.type == "invalid_request_error" and raised.value.code in ("INVALID_REQUEST", "UNSUPPORTED_PARAMETER")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**request, stream=True)


def test_a_bad_body_is_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=["one", "two"])  # a batch
    assert raised.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as raised:
        image = {"type": "image_url", "image_url": {"url": "https://example.com/fox.png"}}
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image]}])
    assert raised.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "narrator", "content": "hi"}])
    assert raised.value.param == "messages.0.role"


def test_a_failed_job_raises_the_matching_error(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="acme/no-such-model", messages=CHAT, max_tokens=2)
    assert raised.value.code == "MODEL_NOT_FOUND"
    stream = client.chat.completions.create(model="acme/no-such-model", messages=CHAT, max_tokens=2, stream=True)
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert raised.value.code == "MODEL_NOT_FOUND"


def test_a_job_cancelled_elsewhere_ends_the_answer_with_an_error(slow_cluster):
    with client_for(slow_cluster.url) as client:
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0, stream=True)
        chunks = iter(stream)
        job_id = job_id_of(next(chunks).id)
        assert httpx.delete(f"{slow_cluster.url}/v1/inference/{job_id}", timeout=10).status_code == 202
        with pytest.raises(openai.APIError) as raised:
            list(chunks)
        assert raised.value.code == "CANCELLED"
    assert status(slow_cluster.url, job_id)["state"] == "cancelled"


def test_an_abandoned_stream_cancels_its_job(slow_cluster):
    # 100 ms a token: 60 tokens would take 6 s.
    with client_for(slow_cluster.url) as client:
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0, stream=True)
        contents = 0
        for chunk in stream:
            job_id = job_id_of(chunk.id)
            contents += bool(chunk.choices and chunk.choices[0].delta.content)
            if contents == 2:
                break
        stream.close()
    processes.wait_until(lambda: status(slow_cluster.url, job_id)["state"] == "cancelled", 5, "cancellation")
    final = status(slow_cluster.url, job_id)
    assert final["stop_reason"] == "cancelled" and final["tokens_out"] < 60


def test_an_abandoned_request_cancels_its_job(slow_cluster):
    """Not streamed: a client that stops waiting cancels its job too."""

    def running_job() -> str | None:
        """The job the worker generates for (one that an earlier test ended may still be listed)."""
        workers = httpx.get(f"{slow_cluster.url}/v1/workers", timeout=10).json()["workers"]
        jobs = (w["current_job"] for w in workers if w["current_job"])
        return next((j for j in jobs if status(slow_cluster.url, j)["state"] == "running"), None)

    with client_for(slow_cluster.url) as client, ThreadPoolExecutor(1) as pool:
        # 100 ms a token: 60 tokens would take 6 s; the client gives up after 3.
        waiting = pool.submit(
            client.with_options(timeout=3).completions.create, model=MODEL, prompt="abandoned", max_tokens=60, temperature=0
        )
        processes.wait_until(lambda: running_job() is not None, 30, "the job to start")
        job_id = running_job()
        with pytest.raises(openai.APITimeoutError):
            waiting.result(timeout=30)
    processes.wait_until(lambda: status(slow_cluster.url, job_id)["state"] == "cancelled", 5, "cancellation")
    assert status(slow_cluster.url, job_id)["tokens_out"] < 60


@pytest.fixture(scope="module")
def secured_hive(redis_url, log_dir):
    """A hive with API keys and no worker: its jobs stay queued."""
    port = processes.free_port()
    proc = processes.start(
        "hive-openai-secured",
        processes.hive_command(
            "serve", "--redis-url", redis_url, "--port", str(port), "--queue", "hive:test-openai-secured", "--no-hub"
        ),
        log_dir,
        env={"HIVE_API_KEYS": f"{KEY_A},{KEY_B}"},
    )
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.health(url)["status"] == "ok", 30, "secured hive", (proc,))
    yield url
    proc.stop()


def test_api_keys_and_job_ownership(secured_hive):
    with client_for(secured_hive, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.chat.completions.create(model=MODEL, messages=CHAT)
        assert raised.value.code == "UNAUTHORIZED" and raised.value.type == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with client_for(secured_hive, api_key=KEY_A) as client:
        assert client.models.list().object == "list"
        # The job waits (no worker): hang up once it is accepted.
        with client.chat.completions.with_streaming_response.create(model=MODEL, messages=CHAT, stream=True) as response:
            job_id = response.headers["x-hive-job-id"]

    def job_status(key: str) -> httpx.Response:
        return httpx.get(f"{secured_hive}/v1/inference/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)

    assert job_status(KEY_B).status_code == 404
    processes.wait_until(lambda: job_status(KEY_A).json()["state"] == "cancelled", 5, "cancellation of the abandoned job")
