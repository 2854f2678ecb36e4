"""``POST /v1/embeddings``: the pooling as plain functions, then the official ``openai``
client against a real hive and worker, each answer checked against the vectors
transformers computes in this process for the same tiny model and pooling."""

from __future__ import annotations

import array
import base64
import json
import shutil

import httpx
import openai
import pytest
import torch

from hive.openai.embeddings import is_token_ids, render
from shared.spec import EmbeddingRequest
from tests.sse import run_job
from tests.tiny_embedders import MAX_POSITIONS, build_encoder, declare_pooling
from worker.engine.unsupported import UnsupportedModel
from worker.model.download import _wanted
from worker.model.embedder import InvalidEmbeddingRequest, Pooling, batches, normalized, pool, read_pooling

TEXTS = ["The quick brown fox", "Hive streams tokens to every follower.", "Bonjour, ça va?", "the lazy dog " * 40]
DIM = 32  # build_encoder's hidden size


# The pooling, alone.


def hand_pooled(hidden: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """One row's pooling written out, over its ``length`` real tokens."""
    real = hidden[:length]
    if mode == "cls":
        return real[0]
    if mode == "mean":
        return real.mean(0)
    if mode == "max":
        return real.max(0).values
    if mode == "lasttoken":
        return real[-1]
    if mode == "mean_sqrt_len":
        return real.sum(0) / length**0.5
    weights = torch.arange(1, length + 1, dtype=real.dtype).unsqueeze(1)
    return (real * weights).sum(0) / weights.sum()


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken", "mean_sqrt_len", "weightedmean"])
def test_each_pooling_mode_ignores_the_padding(mode):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = [5, 2, 3]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    hidden[mask == 0] = 1e6  # what a pad holds must not matter
    pooled = pool(hidden, mask, (mode,))
    for r, n in enumerate(lengths):
        torch.testing.assert_close(pooled[r], hand_pooled(hidden[r], n, mode))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_several_modes_concatenate_in_sentence_transformers_order():
    hidden, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 1], [1, 1, 0]])
    both = pool(hidden, mask, ("cls", "mean"))
    assert both.shape == (2, 8)
    torch.testing.assert_close(both[:, :4], hidden[:, 0])
    torch.testing.assert_close(both[1, 4:], hidden[1, :2].mean(0))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_normalized_and_dimensions():
    vectors = torch.tensor([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(normalized(vectors).norm(dim=1), torch.ones(2))
    torch.testing.assert_close(normalized(vectors, 2), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    with pytest.raises(InvalidEmbeddingRequest, match="more than this model's 3"):
        normalized(vectors, 4)


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_batches_go_longest_first_within_the_token_budget():
    assert batches([3, 10, 5, 4], budget=20) == [[1, 2], [3, 0]]
    assert batches([30, 2], budget=20) == [[0], [1]]  # too long for the budget: alone


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_read_pooling_from_the_sentence_transformers_files(tmp_path):
    assert read_pooling(None) == Pooling(("mean",))
    assert read_pooling(tmp_path) == Pooling(("mean",))  # no modules.json
    declare_pooling(tmp_path / "cls", "cls", dim=4)
    (tmp_path / "cls" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    assert read_pooling(tmp_path / "cls") == Pooling(("cls",), 128, lowercase=True)
    declare_pooling(tmp_path / "prompted", "mean", "lasttoken", dim=4)
    prompts = {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "query"}
    (tmp_path / "prompted" / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    assert read_pooling(tmp_path / "prompted") == Pooling(("mean", "lasttoken"), prompt="query: ")
    declare_pooling(tmp_path / "dense", "mean", dim=4, extra_modules=("Dense",))
    with pytest.raises(UnsupportedModel, match="Dense"):
        read_pooling(tmp_path / "dense")


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_the_download_fetches_the_pooling_config_only_from_subfolders():
    assert all(_wanted(name) for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "model.safetensors"))
    assert not any(_wanted(name) for name in ("2_Dense/model.safetensors", "onnx/model.onnx", "a/1_Pooling/config.json"))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_token_ids_are_told_from_texts():
    assert all(is_token_ids(v) for v in (7, [1, 2, 3], [[1, 2], [3]], ["a", 1]))
    assert not any(is_token_ids(v) for v in ("text", ["a", "b"], [], None, True))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_render_floats_and_base64_give_the_same_float32():
    vectors = torch.randn(2, 3)
    raw = vectors.numpy().astype("<f4").tobytes()
    as_floats = json.loads(render(EmbeddingRequest(model="a/b", input=["x", "y"]), raw, 3, 7))
    as_base64 = json.loads(render(EmbeddingRequest(model="a/b", input=["x", "y"], encoding_format="base64"), raw, 3, 7))
    assert as_floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and as_floats["model"] == "a/b"
    for row, (f, b) in enumerate(zip(as_floats["data"], as_base64["data"])):
        assert f["index"] == b["index"] == row and f["object"] == "embedding"
        decoded = array.array("f", base64.b64decode(b["embedding"])).tolist()
        assert array.array("f", f["embedding"]).tolist() == decoded == vectors[row].tolist()


# Against a real hive and worker.


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(cluster):
    with client_for(cluster.url) as c:
        yield c


@pytest.fixture(scope="module")
def models(hub):
    """Under the hub: a bare BERT (no sentence-transformers files: mean pooling), the same
    declaring CLS pooling, the same with a Dense module, and the tiny Llama declaring
    last-token pooling."""
    acme = hub.root / "acme"
    bert = build_encoder(acme / "embed-bert")
    declare_pooling(shutil.copytree(bert, acme / "embed-cls"), "cls", dim=DIM)
    declare_pooling(shutil.copytree(bert, acme / "embed-dense"), "mean", dim=DIM, extra_modules=("Dense",))
    declare_pooling(shutil.copytree(acme / "tiny", acme / "embed-llama"), "lasttoken", dim=64)
    return acme


def reference(folder, texts: list[str], mode: str) -> torch.Tensor:
    """Each text through transformers alone (no padding, no batch), pooled by hand, normalized."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, return_tensors="pt")
            hidden = model(**ids).last_hidden_state[0]
            rows.append(hand_pooled(hidden, hidden.shape[0], mode))
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def token_count(folder, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return sum(len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"])


def vectors_of(answer) -> torch.Tensor:
    assert [d.index for d in answer.data] == list(range(len(answer.data)))
    return torch.tensor([d.embedding for d in answer.data])


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_embeddings_match_transformers(cluster, client, models):
    answer = client.embeddings.create(model="acme/embed-bert", input=TEXTS, encoding_format="float")
    assert answer.object == "list" and answer.model == "acme/embed-bert"
    vectors = vectors_of(answer)
    assert vectors.shape == (len(TEXTS), DIM)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(vectors, reference(models / "embed-bert", TEXTS, "mean"), atol=1e-4, rtol=0)
    # The long input was truncated to the model's positions, and the usage counts what went in.
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == token_count(models / "embed-bert", TEXTS)
    assert token_count(models / "embed-bert", TEXTS[-1:]) == MAX_POSITIONS

    # The client's default asks for base64 and decodes it: the same float32, bit for bit.
    default = vectors_of(client.embeddings.create(model="acme/embed-bert", input=TEXTS))
    assert torch.equal(default, vectors)
    raw = httpx.post(f"{cluster.url}/v1/embeddings", json={"model": "acme/embed-bert", "input": TEXTS, "encoding_format": "base64"}, timeout=60)
    assert raw.status_code == 200, raw.text
    rows = [array.array("f", base64.b64decode(row["embedding"])).tolist() for row in raw.json()["data"]]
    assert rows == vectors.tolist()
    # One input alone: the same vector, up to the rounding of another batch's shape.
    [alone] = client.embeddings.create(model="acme/embed-bert", input=TEXTS[0]).data
    torch.testing.assert_close(torch.tensor(alone.embedding), vectors[0], atol=1e-5, rtol=0)
    job = httpx.get(f"{cluster.url}/v1/inference/{raw.headers['x-hive-job-id']}", timeout=10).json()
    assert (job["kind"], job["state"], job["stop_reason"]) == ("embedding", "completed", "embedded")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_dimensions_truncate_then_renormalize(client, models):
    full = vectors_of(client.embeddings.create(model="acme/embed-bert", input=TEXTS[:2], encoding_format="float"))
    short = vectors_of(client.embeddings.create(model="acme/embed-bert", input=TEXTS[:2], dimensions=8, encoding_format="float"))
    torch.testing.assert_close(short, torch.nn.functional.normalize(full[:, :8], dim=1), atol=1e-5, rtol=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="acme/embed-bert", input="x", dimensions=DIM + 1)
    assert refused.value.code == "INVALID_REQUEST" and "dimensions" in refused.value.message


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_declared_pooling_is_honoured(cluster, client, models):
    cls = vectors_of(client.embeddings.create(model="acme/embed-cls", input=TEXTS, encoding_format="float"))
    torch.testing.assert_close(cls, reference(models / "embed-cls", TEXTS, "cls"), atol=1e-4, rtol=0)
    assert not torch.allclose(cls, reference(models / "embed-cls", TEXTS, "mean"), atol=1e-2)
    # A decoder (loaded as a causal LM, embedded by its base), rows of unequal length batched
    # together, while the same model in memory has a batch of its own (packed attention).
    _, received = run_job(cluster.url, model="acme/embed-llama", prompt="Hello", max_tokens=2)
    assert received[-2].event == "end"
    last = vectors_of(client.embeddings.create(model="acme/embed-llama", input=TEXTS, encoding_format="float"))
    torch.testing.assert_close(last, reference(models / "embed-llama", TEXTS, "lasttoken"), atol=1e-4, rtol=0)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_module_hive_does_not_run_is_refused(client, models):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="acme/embed-dense", input="x")
    assert refused.value.code == "UNSUPPORTED_MODEL" and "Dense" in refused.value.message


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_bare_encoder_does_not_generate(cluster, models):
    job, received = run_job(cluster.url, model="acme/embed-bert", prompt="Hello", max_tokens=2)
    error = received[-2].json()
    assert error["event"] == "error" and error["code"] == "UNSUPPORTED_MODEL" and "/v1/embeddings" in error["message"]


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("token_ids", [[1, 2, 3], [[1, 2], [3, 4]], 7])
def test_token_ids_are_refused_naming_langchains_setting(client, token_ids):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="acme/embed-bert", input=token_ids)
    assert refused.value.code == "UNSUPPORTED_PARAMETER"
    assert "check_embedding_ctx_length=False" in refused.value.message


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "body",
    [
        {"model": "acme/embed-bert", "input": []},
        {"model": "acme/embed-bert", "input": ""},
        {"model": "acme/embed-bert", "input": ["x"] * 257},
        {"model": "acme/embed-bert", "input": "x", "encoding_format": "int8"},
        {"model": "../x", "input": "x"},
        {"input": "x"},
        ["not", "an", "object"],
    ],
)
def test_invalid_requests_get_openais_400(cluster, body):
    response = httpx.post(f"{cluster.url}/v1/embeddings", json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_REQUEST" and error["message"]
