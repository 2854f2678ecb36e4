"""``POST /v1/responses``: OpenAI's Responses API on the same jobs as chat completions.

Stateless: the request becomes the chat completion it asks for
(hive/openai/responses_params.py), submitted as ``/v1/chat/completions`` submits it,
and the job's events become a Response: one ``message`` item for its text, one
``function_call`` item per tool call. Nothing is stored, so there is no
``GET /v1/responses/<id>`` and no ``previous_response_id``: a client sends the whole
conversation each time. The response's id is ``resp_<job_id>``; its items' ids are
``msg_<job_id>`` and ``fc_<job_id>_<k>``.

Streamed, the answer is the Responses API's typed events (``event:`` and ``data:``
lines, numbered by ``sequence_number``), sent through the same SSE stream as chat's:
the same pings, the same end on shutdown, and a client that leaves cancels its job.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator

import redis.exceptions
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.bodies import check_schemas, read_json_body
from hive.api.errors import ApiError
from hive.api.state import Hive, hive_of
from hive.openai.responses_params import ResponsesParams, parse_responses, renamed
from hive.openai.routes import event_stream, failure_response, follow_to_end, job_events, job_failure, openai_errors, submit_choices, usage
from hive.openai.shapes import Choice
from shared.spec import InferenceRequest

log = logging.getLogger("hive.openai")


def echoed(params: ResponsesParams, spec: InferenceRequest) -> dict:
    """The request's settings as a Response repeats them."""
    functions = [tool.function for tool in spec.tools or ()]
    tools = [
        {"type": "function", "name": f.name, "description": f.description, "parameters": f.parameters, "strict": f.strict} for f in functions
    ]
    text_format = params.text.format if params.text is not None and params.text.format else {"type": "text"}
    return {
        "model": params.model,
        "instructions": params.instructions,
        "max_output_tokens": params.max_output_tokens,
        "metadata": params.metadata or {},
        "parallel_tool_calls": spec.parallel_tool_calls,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "tool_choice": params.tool_choice or "auto",
        "tools": tools,
        "text": {"format": text_format},
        "truncation": "disabled",
        "store": False,  # nothing is stored, whatever the request said
        "background": False,
        "previous_response_id": None,
        "reasoning": None,
        "user": params.user,
    }


def response_object(
    job_id: str, created_at: int, echo: dict, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None
) -> dict:
    return {
        "id": f"resp_{job_id}",
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "output": output,
        "usage": usage,
        **echo,
    }


def response_usage(counts: dict) -> dict:
    """Chat's usage (the job record's counts) as the Responses API's."""
    return {
        "input_tokens": counts["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": counts["prompt_tokens_details"]["cached_tokens"], "cache_write_tokens": 0},
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"],
    }


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(job_id: str, text: str, status: str) -> dict:
    return {"id": f"msg_{job_id}", "type": "message", "status": status, "role": "assistant", "content": [output_text(text)]}


def call_item(job_id: str, k: int, call: dict, status: str) -> dict:
    """Tool call ``k`` (chat's shape, as ``Choice`` holds it) as a ``function_call`` item."""
    item = {"id": f"fc_{job_id}_{k}", "type": "function_call", "status": status, "call_id": call["id"]}
    return item | {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def status_of(end: dict) -> str:
    return "incomplete" if end["stop_reason"] == "max_tokens" else "completed"


def output_items(choice: Choice) -> list[dict]:
    """A finished job's output: its text (when there is any, or nothing else), then its calls."""
    items = [message_item(choice.job_id, choice.text, "completed")] if choice.text or not choice.tool_calls else []
    items += [call_item(choice.job_id, k, call, "completed") for k, call in enumerate(choice.tool_calls)]
    items[-1]["status"] = status_of(choice.end[1])  # a length stop cuts the last item short
    return items


class ResponseStream:
    """One job's events as the Responses API's stream events. Text comes before any
    call (worker/grammar/tool_call_stream.py), so items open and close one at a time:
    the message, then each call."""

    def __init__(self, job_id: str, echo: dict):
        self.job_id, self.echo = job_id, echo
        self.created_at = int(time.time())
        self.choice = Choice(0, job_id)
        #: The output items so far; the last is still being written while ``writing``.
        self.items: list[dict] = []
        self.writing = False
        self.numbers = itertools.count()

    def frame(self, type_: str, **fields) -> bytes:
        data = json.dumps({"type": type_, "sequence_number": next(self.numbers), **fields}, ensure_ascii=False, separators=(",", ":"))
        return f"event: {type_}\ndata: {data}\n\n".encode()

    def response(self, status: str, **fields) -> dict:
        return response_object(self.job_id, self.created_at, self.echo, status, self.items, **fields)

    def where(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def start(self) -> list[bytes]:
        created = self.response("in_progress")
        return [self.frame("response.created", response=created), self.frame("response.in_progress", response=created)]

    def add(self, type_: str, event: dict) -> list[bytes]:
        """The frames for a token or a tool call (none for progress events)."""
        self.choice.add(type_, event)
        frames = []
        if type_ == "token" and event["t"]:
            if not self.items:
                frames += self.open_item(message_item(self.job_id, "", "in_progress"))
            if self.items[-1]["type"] == "message":  # never text after a call: see the class's docstring
                frames.append(self.frame("response.output_text.delta", **self.where(), content_index=0, delta=event["t"], logprobs=[]))
        elif type_ == "tool_call":
            if event["id"] is not None:
                frames += self.close_item("completed")
                call = {"id": event["id"], "function": {"name": event["name"], "arguments": ""}}
                frames += self.open_item(call_item(self.job_id, event["index"], call, "in_progress"))
            if event["arguments"]:
                frames.append(self.frame("response.function_call_arguments.delta", **self.where(), delta=event["arguments"]))
        return frames

    def open_item(self, item: dict) -> list[bytes]:
        self.items.append(item)
        self.writing = True
        frames = [self.frame("response.output_item.added", output_index=len(self.items) - 1, item=item)]
        if item["type"] == "message":
            frames.append(self.frame("response.content_part.added", **self.where(), content_index=0, part=output_text("")))
        return frames

    def close_item(self, status: str) -> list[bytes]:
        if not self.writing:
            return []
        self.writing = False
        where = self.where()
        if self.items[-1]["type"] == "message":
            item = self.items[-1] = message_item(self.job_id, self.choice.text, status)
            part = item["content"][0]
            frames = [
                self.frame("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]),
                self.frame("response.content_part.done", **where, content_index=0, part=part),
            ]
        else:
            k = len(self.choice.tool_calls) - 1
            item = self.items[-1] = call_item(self.job_id, k, self.choice.tool_calls[k], status)
            frames = [self.frame("response.function_call_arguments.done", **where, arguments=item["arguments"])]
        return [*frames, self.frame("response.output_item.done", output_index=where["output_index"], item=item)]

    def finish(self, end: dict, counts: dict | None) -> list[bytes]:
        """The last item's end, then ``response.completed`` (or ``.incomplete``) with the whole response."""
        status = status_of(end)
        frames = [] if self.items else self.open_item(message_item(self.job_id, "", "in_progress"))
        frames += self.close_item(status)
        return [*frames, self.frame(f"response.{status}", response=self.response(status, usage=counts and response_usage(counts)))]

    def fail(self, code: str, message: str) -> list[bytes]:
        return [self.frame("response.failed", response=self.response("failed", error={"code": code, "message": message}))]


async def stream_events(hive: Hive, job_id: str, echo: dict) -> AsyncIterator[bytes]:
    """The job's Responses stream, ending with ``response.completed``, ``.incomplete``
    or ``.failed``; progress events are left out (the SSE pings keep the connection)."""
    stream = ResponseStream(job_id, echo)
    for frame in stream.start():
        yield frame
    async with contextlib.aclosing(job_events(hive, job_id)) as events:
        async for type_, event in events:
            if type_ == "gap":  # no way to say "text missing here": the stream ends clearly instead
                lost = event["last"] - event["first"] + 1
                message = f"a Redis failover lost {lost} events of this stream; the whole output is at /v1/inference/{job_id}"
                frames = stream.fail("EVENTS_LOST", message)
            elif type_ in ("end", "error"):
                failure = job_failure(type_, event)
                if failure is not None:
                    frames = stream.fail(*failure)
                else:
                    try:
                        counts = await usage(hive, [job_id])
                    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                        log.warning("job %s: usage unread, Redis unavailable: %s", job_id, e)
                        counts = None
                    frames = stream.finish(event, counts)
            else:
                frames = stream.add(type_, event)
            for frame in frames:
                yield frame
            if type_ in ("gap", "end", "error"):
                return


@openai_errors
async def create_response(request: Request) -> Response:
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    body = await read_json_body(request, hive.settings.max_body_bytes)
    params, spec = parse_responses(body)
    try:
        await check_schemas(spec)
    except ApiError as e:
        raise renamed(e, []) from None
    [job_id], headers = await submit_choices(request, spec, 1, body, principal.owner)
    echo = echoed(params, spec)
    if params.stream:
        return event_stream(hive, stream_events(hive, job_id, echo), headers)
    created_at = int(time.time())
    choices = await follow_to_end(request, hive, [job_id])
    if choices is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    failed = failure_response(choices, headers)
    if failed is not None:
        return failed
    [choice] = choices
    counts = response_usage(await usage(hive, [job_id]))
    return JSONResponse(response_object(job_id, created_at, echo, status_of(choice.end[1]), output_items(choice), counts), headers=headers)


routes = [Route("/v1/responses", create_response, methods=["POST"])]
