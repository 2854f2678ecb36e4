"""``POST /v1/responses`` through the official ``openai`` client, against a real hive
and worker: the same jobs as chat completions, answered as Responses. The model has
random weights: calls and JSON are well-formed because of the grammar alone."""

from __future__ import annotations

import itertools
import json

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.sse import status
from tests.test_openai import client_for
from tests.test_tools import WEATHER

pytestmark = pytest.mark.e2e

MODEL = "acme/tiny-tools"
QUESTION = "What is the weather in Paris?"
#: chat's tool in the Responses API's flat shape
WEATHER_TOOL = {"type": "function", **WEATHER["function"]}
NAMED = {"type": "function", "name": "get_weather"}
IMAGE = {"type": "input_image", "image_url": "https://x.test/a.png"}


@pytest.fixture(scope="module")
def client(cluster):
    with client_for(cluster.url) as c:
        yield c


def job_id_of(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def chat_text(client, messages, **fields) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **fields).choices[0].message.content


def function_calls(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


@pytest.mark.parametrize(
    "request_fields",
    [
        {"instructions": "Answer briefly.", "input": QUESTION},
        {
            "input": [
                {"role": "developer", "content": "Answer briefly."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
            ]
        },
    ],
)
def test_text_input_answers_as_the_chat_completion_does(cluster, client, request_fields):
    fields = {"max_output_tokens": 8, "temperature": 0, "store": True, "metadata": {"k": "v"}, **request_fields}
    raw = client.responses.with_raw_response.create(model=MODEL, **fields)
    # Validated (the client only builds its models): every field the model requires is there.
    response = Response.model_validate(raw.http_response.json())
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    assert response.output_text == chat_text(client, messages, max_tokens=8) != ""
    assert response.object == "response" and response.id.startswith("resp_") and response.store is False
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    record = status(cluster.url, job_id_of(response.id))
    assert response.usage.input_tokens == record["prompt_tokens"] and response.usage.output_tokens == record["tokens_out"]
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if record["stop_reason"] == "max_tokens":
        assert response.status == message.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == message.status == "completed" and response.incomplete_details is None


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_a_required_tool_choice_answers_function_call_items(cluster, client, tool_choice):
    response = client.responses.create(
        model=MODEL, input=QUESTION, tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=False, max_output_tokens=200
    )
    assert response.status == "completed" and response.tools[0].name == "get_weather" and response.parallel_tool_calls is False
    [call] = function_calls(response)
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit") and len(arguments["city"]) <= 12
    [recorded] = status(cluster.url, job_id_of(response.id))["tool_calls"]
    assert recorded == {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def test_a_tool_round_trip_is_the_chat_conversation(client):
    """The call's item and its output go back in the input: the job is the chat
    completion of the same conversation (same text at temperature 0)."""
    first = client.responses.create(model=MODEL, input=QUESTION, tools=[WEATHER_TOOL], tool_choice=NAMED, max_output_tokens=200)
    [call] = first.output
    items = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees and sunny"},
    ]
    second = client.responses.create(model=MODEL, input=items, tools=[WEATHER_TOOL], tool_choice="none", max_output_tokens=8, temperature=0)
    assert function_calls(second) == [] and second.usage.input_tokens > first.usage.input_tokens
    function = {"name": call.name, "arguments": call.arguments}
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "21 degrees and sunny"},
    ]
    assert second.output_text == chat_text(client, history, tools=[WEATHER], tool_choice="none", max_tokens=8)


def test_a_json_schema_format_gives_json_of_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    text_format = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    for seed in range(2):
        response = client.responses.create(model=MODEL, input=QUESTION, text=text_format, max_output_tokens=200, extra_body={"seed": seed})
        value = json.loads(response.output_text)
        assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120 and len(value["name"]) <= 8
        assert response.text.format.type == "json_schema" and response.text.format.name == "person"


def collapsed(types: list[str]) -> list[str]:
    """The event types with each run of deltas as one."""
    return [t for t, _ in itertools.groupby(types)]


@pytest.mark.parametrize("kind", ["text", "call"])
def test_streamed_events_come_in_order_and_join_to_the_answer(client, kind):
    fields = {"tools": [WEATHER_TOOL], "tool_choice": NAMED, "max_output_tokens": 200} if kind == "call" else {"max_output_tokens": 12}
    events = list(client.responses.create(model=MODEL, input=QUESTION, temperature=0, stream=True, **fields))
    for event in events:  # validated, as above
        TypeAdapter(ResponseStreamEvent).validate_python(event.model_dump(mode="json", by_alias=True, exclude_unset=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    whole = client.responses.create(model=MODEL, input=QUESTION, temperature=0, **fields)
    assert [item.type for item in final.output] == [item.type for item in whole.output]
    if kind == "text":
        end = "response.incomplete" if final.status == "incomplete" else "response.completed"
        assert collapsed([e.type for e in events]) == [
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.done", "response.content_part.done", "response.output_item.done", end,
        ]  # fmt: skip
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == final.output_text == whole.output_text != ""
        assert next(e for e in events if e.type == "response.output_text.done").text == text
    else:
        assert collapsed([e.type for e in events]) == [
            "response.created", "response.in_progress", "response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done", "response.completed",
        ]  # fmt: skip
        added = events[2].item
        assert added.type == "function_call" and added.arguments == "" and added.name == "get_weather" and added.status == "in_progress"
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        [call] = function_calls(final)
        assert call.arguments == arguments == function_calls(whole)[0].arguments and call.call_id == added.call_id
        assert set(json.loads(arguments)) == {"city", "unit"}
    assert final.usage.output_tokens == whole.usage.output_tokens > 0


@pytest.mark.parametrize(
    "fields, code, param",
    [
        ({"previous_response_id": "resp_abc"}, "UNSUPPORTED_PARAMETER", "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "UNSUPPORTED_PARAMETER", "tools.0.type"),
        ({"input": [{"role": "user", "content": [IMAGE]}]}, "UNSUPPORTED_PARAMETER", "input.0.content.0"),
        ({"max_output_tokens": 100_000}, "INVALID_REQUEST", "max_output_tokens"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(client, fields, code, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, **{"input": QUESTION, **fields})
    assert refused.value.code == code and refused.value.param == param, refused.value
    if param == "previous_response_id":
        assert "stateless" in refused.value.message


def test_a_failed_job_is_an_error_or_a_failed_response(cluster, client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="acme/no-such-model", input=QUESTION, max_output_tokens=2)
    assert raised.value.code == "MODEL_NOT_FOUND"
    # Streamed: each event's SSE name is its type; the last is response.failed with the job's error.
    body = {"model": "acme/no-such-model", "input": QUESTION, "max_output_tokens": 2, "stream": True}
    with httpx.Client(timeout=60) as http, connect_sse(http, "POST", f"{cluster.url}/v1/responses", json=body) as source:
        events = [(sse.event, sse.json()) for sse in source.iter_sse()]
    names = ["response.created", "response.in_progress", "response.failed"]
    assert [name for name, _ in events] == [data["type"] for _, data in events] == names
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "MODEL_NOT_FOUND"
