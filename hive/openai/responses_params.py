"""``POST /v1/responses``'s body as the chat completion it asks for, hence the same job.

The input items become chat messages (``function_call`` items an assistant's
``tool_calls``, ``function_call_output`` items ``tool`` messages), the flat function
tools chat's nested ones, ``text.format`` the ``response_format``; then
``hive.openai.params.parse`` checks and builds the job as for ``/v1/chat/completions``.
Its refusals name the Responses API's fields (``input.2``, ``max_output_tokens``).
Nothing is stored: what refers to an earlier response is a 400.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError

from hive.api.bodies import validation_error
from hive.api.errors import ApiError
from hive.openai.params import ChatParams, parse
from shared.spec import InferenceRequest

STATELESS = "Hive's Responses API is stateless: nothing is stored, so send the whole conversation in input (earlier output items included)"
#: Fields that ask for something Hive cannot do, with the values that ask for nothing.
UNSUPPORTED = {
    "previous_response_id": ((None,), STATELESS),
    "conversation": ((None,), STATELESS),
    "background": ((None, False), "background responses are stored ones, and Hive's Responses API stores nothing"),
    "prompt": ((None,), "stored prompt templates are not supported; send the instructions and input"),
    "max_tool_calls": ((None,), "not supported (parallel_tool_calls: false allows at most one call)"),
    "top_logprobs": ((None, 0), "not supported on /v1/responses (use /v1/chat/completions)"),
}
#: Hive's own fields, passed on as chat's (``extra_body=`` with the openai client).
PASSED_ON = (
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "revision",
    "keep_alive",
    "prefix_cache",
)
TEXT_PARTS = ("input_text", "output_text")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class InputItem(BaseModel):
    """One item of ``input``: a message, a function call the model made, or its output."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str = "message"
    role: str | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    format: dict | None = None


class ResponsesParams(BaseModel):
    """What Hive reads of the body; others (``store``, ``metadata``, ``user``, ``reasoning``,
    ``truncation``, ``include``, …) are ignored, unless ``UNSUPPORTED`` lists them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = None
    stream: bool | None = False
    metadata: dict | None = None
    user: str | None = None


def refusal(field: str, message: str, code: str = "UNSUPPORTED_PARAMETER") -> ApiError:
    return ApiError(400, code, f"{field}: {message}", [{"field": field, "message": message}])


def text_of(parts: str | list[ContentPart] | None, field: str) -> str:
    """A content's text: its text parts joined; any other part (an image, a file) is a 400."""
    if parts is None or isinstance(parts, str):
        return parts or ""
    for k, part in enumerate(parts):
        if part.type not in TEXT_PARTS or part.text is None:
            raise refusal(f"{field}.{k}", f"{part.type} content is not supported: only text ({', '.join(TEXT_PARTS)})")
    return "\n".join(part.text for part in parts)


def messages_of(params: ResponsesParams) -> tuple[list[dict], list[str]]:
    """The chat messages, and for each the Responses field it comes from (for errors)."""
    messages, sources = [], []
    if params.instructions is not None:
        messages.append({"role": "system", "content": params.instructions})
        sources.append("instructions")
    if isinstance(params.input, str):
        return [*messages, {"role": "user", "content": params.input}], [*sources, "input"]
    for k, item in enumerate(params.input):
        field = f"input.{k}"
        if item.type == "message":
            if item.role not in ("user", "system", "developer", "assistant"):
                message = f"{item.role!r} is not a role of a message (user, system, developer, assistant)"
                raise refusal(f"{field}.role", message, "INVALID_REQUEST")
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": text_of(item.content, f"{field}.content")})
        elif item.type == "function_call":
            if item.call_id is None or item.name is None or item.arguments is None:
                raise refusal(field, "a function_call item has call_id, name and arguments", "INVALID_REQUEST")
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            # The model's text and its calls, or consecutive calls, are one assistant message.
            if messages and messages[-1]["role"] == "assistant" and sources[-1] == f"input.{k - 1}":
                messages[-1].setdefault("tool_calls", []).append(call)
                sources[-1] = field
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            if item.call_id is None or item.output is None:
                raise refusal(field, "a function_call_output item has call_id and output", "INVALID_REQUEST")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text_of(item.output, f"{field}.output")})
        else:
            why = STATELESS if item.type == "item_reference" else "only message, function_call and function_call_output items are supported"
            raise refusal(f"{field}.type", f"{item.type} items are not supported: {why}")
        sources.append(field)
    return messages, sources


def chat_tool(tool: dict, k: int) -> dict:
    """A Responses function tool (flat) as chat's (nested); other kinds of tool are a 400."""
    if tool.get("type") != "function":
        raise refusal(f"tools.{k}.type", f"{tool.get('type')} tools are not supported: only function tools")
    function = {name: tool[name] for name in ("name", "description", "parameters", "strict") if tool.get(name) is not None}
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | dict) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or "name" not in choice:
        raise refusal("tool_choice", "only 'auto', 'none', 'required' or {type: 'function', name} are supported")
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format(format_: dict) -> dict:
    if format_.get("type") != "json_schema":
        return format_
    fields = {name: format_[name] for name in ("name", "description", "schema", "strict") if format_.get(name) is not None}
    return {"type": "json_schema", "json_schema": fields}


#: Chat's field names, in its refusals, as the Responses API's.
RENAMED = [
    (r"\bmax_tokens\b", "max_output_tokens"),
    (r"\bresponse_format\.json_schema\b", "text.format"),
    (r"\bresponse_format\b", "text.format"),
    (r"\btools\.(\d+)\.function\b", r"tools.\1"),
    (r"\btool_choice\.function\b", "tool_choice"),
]


def renamed(e: ApiError, sources: list[str]) -> ApiError:
    """The refusal of the chat request, naming the fields of the Responses request."""

    def rename(text: str | None) -> str | None:
        if text is None:
            return None
        text = re.sub(r"\bmessages\.(\d+)", lambda m: sources[int(m.group(1))], text)
        text = re.sub(r"\bmessages\b", "input", text)
        for pattern, replacement in RENAMED:
            text = re.sub(pattern, replacement, text)
        return text

    details = [{**d, "field": rename(d.get("field")), "message": rename(d.get("message"))} for d in e.details or []]
    return ApiError(e.status, e.code, rename(e.message), details or None, e.headers)


def parse_responses(body: object) -> tuple[ResponsesParams, InferenceRequest]:
    """The Responses request and the job it asks for; ApiError (400) when Hive cannot honour it."""
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_REQUEST", "the body must be a JSON object")
    for name, (neutral, message) in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise refusal(name, message)
    try:
        params = ResponsesParams.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e
    messages, sources = messages_of(params)
    chat: dict = {"model": params.model, "messages": messages, "max_tokens": params.max_output_tokens}
    chat |= {name: body[name] for name in PASSED_ON if body.get(name) is not None}
    if params.tools:
        chat["tools"] = [chat_tool(tool, k) for k, tool in enumerate(params.tools)]
    if params.tool_choice is not None:
        chat["tool_choice"] = chat_tool_choice(params.tool_choice)
    if params.parallel_tool_calls is not None:
        chat["parallel_tool_calls"] = params.parallel_tool_calls
    if params.text is not None and params.text.format is not None:
        chat["response_format"] = response_format(params.text.format)
    try:
        _, spec = parse(chat, ChatParams)
    except ApiError as e:
        raise renamed(e, sources) from e
    return params, spec
