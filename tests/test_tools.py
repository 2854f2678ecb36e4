"""Tool calls, structured output, logprobs, n and penalties through the official
``openai`` client, against a real hive and worker. The model has random weights:
every call and every JSON answer is well-formed because of the grammar alone."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.sse import status, submit
from tests.test_openai import client_for, job_id_of
from tests.tiny_models import build_tokenizer

pytestmark = pytest.mark.e2e

MODEL = "acme/tiny-tools"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 10}}, "required": ["query"]},
    },
}


@pytest.fixture(scope="module")
def client(cluster):
    with client_for(cluster.url) as c:
        yield c


def assert_weather_call(call) -> dict:
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_tool_choice_gives_one_valid_call(cluster, client, choice):
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], tool_choice=choice, parallel_tool_calls=False, max_tokens=200, seed=3
    )
    [answer] = completion.choices
    assert answer.finish_reason == "tool_calls"
    if isinstance(choice, dict):
        [call] = answer.message.tool_calls
        assert_weather_call(call)
    else:
        [call] = answer.message.tool_calls
        assert call.function.name in ("get_weather", "search") and isinstance(json.loads(call.function.arguments), dict)
    # The job's record keeps them: GET /v1/inference/<id> shows the same calls.
    record = status(cluster.url, job_id_of(completion.id))
    assert record["tool_calls"] == [c.model_dump(exclude_none=True) for c in answer.message.tool_calls]
    assert record["stop_reason"] == "tool_calls"


def test_streamed_tool_call_fragments_join_to_the_final_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=200, seed=5, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:]) and len(deltas) > 2
    arguments = "".join(d.function.arguments for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The same request, not streamed, gives exactly the same call (same seed).
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=200, seed=5)
    assert whole.choices[0].message.tool_calls[0].function.arguments == arguments
    assert_weather_call(whole.choices[0].message.tool_calls[0])


def test_a_tool_conversation_round_trips(client):
    """The call, the tool's answer, and the next answer: the history goes back in
    the model's template (arguments as objects, the answer as a tool message)."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=200)
    message = first.choices[0].message
    [call] = message.tool_calls
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.tool_calls is None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_is_valid_json_of_the_schema(client, stream):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    for seed in range(3):
        request = dict(model=MODEL, messages=ASK, response_format=response_format, max_tokens=300, seed=seed, temperature=1.0)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**request, stream=True) if c.choices)
        else:
            text = client.chat.completions.create(**request).choices[0].message.content
        value = json.loads(text)
        assert set(value) == {"name", "age", "tags"} and 0 <= value["age"] <= 120 and len(value["name"]) <= 8
        assert set(value["tags"]) <= {"a", "b"} and len(value["tags"]) <= 3


def test_json_object_output_is_a_json_object(client):
    # An object may go on forever: a bias towards "}" (applied before the grammar's
    # mask) lets the random model close it wherever the grammar allows.
    [close] = build_tokenizer()("}")["input_ids"]
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=400, seed=1, logit_bias={str(close): 8}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_logprobs_are_the_tokens_with_their_most_likely_alternatives(client):
    completion = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    items = completion.choices[0].logprobs.content
    assert len(items) == completion.usage.completion_tokens
    for item in items:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        # Greedy: the token taken is the most likely one.
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob) and item.top_logprobs[0].token == item.token
    assert "".join(bytes(item.bytes).decode("utf-8", "replace") for item in items) == completion.choices[0].message.content
    streamed = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed_items = [i for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.logprob for i in streamed_items] == pytest.approx([i.logprob for i in items])


def test_n_choices_are_jobs_of_their_own(cluster, client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=6, n=3, seed=7)
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    job_ids = raw.headers["x-hive-job-id"].split(",")
    assert completion.usage.completion_tokens == sum(status(cluster.url, job_id)["tokens_out"] for job_id in job_ids)
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, n=3, seed=7, stream=True)
    streamed = {0: "", 1: "", 2: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[k] for k in range(3)] == texts


def test_logit_bias_takes_a_token_or_bans_it(client):
    [the] = build_tokenizer()(" the")["input_ids"]
    biased = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0, logit_bias={str(the): 100})
    assert biased.choices[0].message.content == " the" * 4
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    [first_id] = build_tokenizer()(first.token)["input_ids"]
    banned = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1, logit_bias={str(first_id): -100}
    )
    taken = banned.choices[0].logprobs.content[0]
    assert taken.token != first.token
    # Logprobs are the model's own, before the bias: the banned token is still the most likely, as it was.
    assert taken.top_logprobs[0].token == first.token and taken.top_logprobs[0].logprob == pytest.approx(first.logprob)


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "INVALID_REQUEST"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}}, "UNSUPPORTED_SCHEMA"),
        ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "array", "uniqueItems": True}}}]}, "UNSUPPORTED_SCHEMA"),
        ({"logit_bias": {"99999": 1}}, "INVALID_REQUEST"),
        ({"tool_choice": "required"}, "INVALID_REQUEST"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_with_a_code(client, fields, code):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **fields)
    assert refused.value.code == code, refused.value


def test_a_model_without_a_tool_format_refuses_tools(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="acme/tiny", messages=ASK, tools=[WEATHER], max_tokens=4)
    assert refused.value.code == "TOOLS_NOT_SUPPORTED" and "tool-call format" in refused.value.message


def test_the_native_api_streams_tool_call_events(cluster):
    named = {"type": "function", "function": {"name": "get_weather"}}
    job = submit(cluster.url, model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=200, seed=5)
    with httpx.stream("GET", f"{cluster.url}{job['sse_url']}", timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    calls = [e for e in events if e["event"] == "tool_call"]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    arguments = "".join(e["arguments"] for e in calls)
    assert_weather_call_json(arguments)
    assert events[-1]["event"] == "end" and events[-1]["stop_reason"] == "tool_calls"
    assert status(cluster.url, job["job_id"])["tool_calls"][0]["function"]["arguments"] == arguments


def assert_weather_call_json(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"}


def test_the_completions_api_lists_logprobs_in_columns(client):
    completion = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0, logprobs=2)
    [choice] = completion.choices
    columns = choice.logprobs
    assert len(columns.tokens) == len(columns.token_logprobs) == len(columns.top_logprobs) == completion.usage.completion_tokens
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(value) for top, value in zip(columns.top_logprobs, columns.token_logprobs))
    assert columns.text_offset[0] == 0 and columns.text_offset == sorted(columns.text_offset)
