"""OpenAI's request bodies (``/v1/chat/completions``, ``/v1/completions``) and the
Hive job each asks for: pydantic at this edge only, as the rest of the hive reads
``InferenceRequest`` (shared/spec.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from hive.api.bodies import validation_error
from hive.api.errors import ApiError
from shared.spec import InferenceRequest

#: OpenAI's default is "until the model stops or its context is full": Hive's own
#: limit, which the worker lowers to what the model's context leaves after the prompt.
DEFAULT_MAX_TOKENS = next(m.le for m in InferenceRequest.model_fields["max_tokens"].metadata if hasattr(m, "le"))

#: OpenAI parameters Hive cannot honour, with the values that ask for nothing: any
#: other value is a 400 naming the parameter, not an answer that ignores it.
UNSUPPORTED = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class CommonParams(BaseModel):
    """What both endpoints read. Other OpenAI fields (``user``, ``store``, …) are
    ignored, as other compatible servers do, unless ``UNSUPPORTED`` lists them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Hive's own, for clients that send extra fields (the openai client's extra_body).
    top_k: int | None = None
    revision: str | None = None
    keep_alive: float | str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[ContentPart] | None = None

    def as_hive(self) -> dict:
        """Hive's ``{role, content}``: text parts joined, ``developer`` as ``system``."""
        content = self.content or ""
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ValueError("only text content parts are supported")
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatParams(CommonParams):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionParams(CommonParams):
    prompt: str | list[str]


def parse(body: object, params_type: type[CommonParams]) -> tuple[CommonParams, InferenceRequest]:
    """OpenAI's request as the job it asks for; ApiError (400) when Hive cannot honour it."""
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
    else:
        prompts = [params.prompt] if isinstance(params.prompt, str) else params.prompt
        if len(prompts) != 1:
            message = "one prompt per request (a batch of prompts is not supported)"
            raise ApiError(400, "UNSUPPORTED_PARAMETER", message, [{"field": "prompt", "message": message}])
        fields["prompt"] = prompts[0]
    for name in ("temperature", "top_p", "seed", "top_k", "revision", "keep_alive"):
        if getattr(params, name) is not None:
            fields[name] = getattr(params, name)
    if params.stop is not None:
        fields["stop"] = [params.stop] if isinstance(params.stop, str) else params.stop
    try:
        return params, InferenceRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from e
