"""OpenAI's request bodies (``/v1/chat/completions``, ``/v1/completions``) and the
Hive job each asks for: pydantic at this edge only, as the rest of the hive reads
``InferenceRequest`` (shared/spec.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hive.api.bodies import validation_error
from hive.api.errors import ApiError
from shared.spec import InferenceRequest

#: OpenAI's default is "until the model stops or its context is full": Hive's own
#: limit, which the worker lowers to what the model's context leaves after the prompt.
DEFAULT_MAX_TOKENS = next(m.le for m in InferenceRequest.model_fields["max_tokens"].metadata if hasattr(m, "le"))

#: OpenAI parameters Hive cannot honour, with the values that ask for nothing: any
#: other value is a 400 naming the parameter, not an answer that ignores it.
UNSUPPORTED = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}
#: The most choices one request may ask for (``n``): each is a job of its own in the
#: same batch, so this bounds what one request takes of a worker's rows.
MAX_CHOICES = 16
#: Fields passed to the job as they are, when given.
PASSED_ON = (
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "revision",
    "keep_alive",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "prefix_cache",
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class CommonParams(BaseModel):
    """What both endpoints read. Other OpenAI fields (``user``, ``store``, …) are
    ignored, as other compatible servers do, unless ``UNSUPPORTED`` lists them;
    the job's own validation (shared/spec.py) checks the values."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    # Hive's own, for clients that send extra fields (the openai client's extra_body).
    top_k: int | None = None
    repetition_penalty: float | None = None
    revision: str | None = None
    keep_alive: float | str | None = None
    prefix_cache: bool | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    def as_hive(self) -> dict:
        """Hive's message: text parts joined, ``developer`` as ``system``."""
        content = self.content
        if isinstance(content, list):
            if any(part.type not in ("text", "input_text", "output_text") or part.text is None for part in content):
                raise ValueError("only text content parts are supported")
            content = "\n".join(part.text for part in content)
        message: dict = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if content is None and not self.tool_calls:
            message["content"] = ""
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatParams(CommonParams):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class CompletionParams(CommonParams):
    prompt: str | list[str]
    #: The completions API's logprobs: how many of the most likely tokens to list (0-5).
    logprobs: int | None = None


def parse(body: object, params_type: type[CommonParams]) -> tuple[CommonParams, InferenceRequest]:
    """OpenAI's request as the job it asks for (one per choice: ``n``); ApiError (400)
    when Hive cannot honour it. Its schemas are checked after (``check_schemas``), off the event loop."""
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_REQUEST", "the body must be a JSON object")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            message = f"{name}: not supported by Hive (leave it out)"
            raise ApiError(400, "UNSUPPORTED_PARAMETER", message, [{"field": name, "message": message}])
    try:
        params = params_type.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    fields: dict = {"model": params.model, "cancel_on_disconnect": True, "max_tokens": max_tokens}
    if isinstance(params, ChatParams):
        try:
            fields["messages"] = [m.as_hive() for m in params.messages]
        except ValueError as e:
            raise ApiError(400, "INVALID_REQUEST", f"messages: {e}", [{"field": "messages", "message": str(e)}]) from e
        if params.max_completion_tokens is not None:  # what OpenAI now calls max_tokens
            fields["max_tokens"] = params.max_completion_tokens
        if params.logprobs:
            fields["logprobs"] = True
            fields["top_logprobs"] = params.top_logprobs or 0
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            if getattr(params, name) is not None:
                fields[name] = getattr(params, name)
    else:
        prompts = [params.prompt] if isinstance(params.prompt, str) else params.prompt
        if len(prompts) != 1:
            message = "one prompt per request (a batch of prompts is not supported)"
            raise ApiError(400, "UNSUPPORTED_PARAMETER", message, [{"field": "prompt", "message": message}])
        fields["prompt"] = prompts[0]
        if params.logprobs is not None:
            fields["logprobs"] = True
            fields["top_logprobs"] = params.logprobs
    for name in PASSED_ON:
        if getattr(params, name) is not None:
            fields[name] = getattr(params, name)
    if fields.get("response_format") == {"type": "text"}:
        del fields["response_format"]
    if params.stop is not None:
        fields["stop"] = [params.stop] if isinstance(params.stop, str) else params.stop
    try:
        return params, InferenceRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from e
