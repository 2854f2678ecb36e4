"""The inference job spec: what a client posts and what a worker receives.

Validated with pydantic at the HTTP edge; travels to the worker as plain JSON
(RQ's JSONSerializer), never pickled.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A hub repo id: ``org/name``; no path tricks ("..", leading dots or dashes).
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$"


_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: The longest keep-alive a request may ask for; a negative one means "until evicted".
MAX_KEEP_ALIVE_S = 7 * 24 * 3600.0


def parse_duration(value: int | float | str) -> float:
    """Seconds from ``300``, ``"300"``, ``"30s"``, ``"5m"``, ``"1h"`` (as Ollama's
    keep_alive); negative means forever, returned as -1."""
    if isinstance(value, bool):
        raise ValueError("expected seconds or a duration like '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif not isinstance(value, str):
        raise ValueError("expected seconds or a duration like '5m'")
    else:
        match = _DURATION.match(value.strip())
        if not match:
            raise ValueError("expected seconds or a duration like '30s', '5m', '1h'")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds < 0:
        return -1.0
    if seconds != seconds or seconds > MAX_KEEP_ALIVE_S:
        raise ValueError(f"at most {MAX_KEEP_ALIVE_S:g} s (or negative: until evicted)")
    return seconds


#: What a webhook may be called for: the job started, its output so far (at most
#: twice a second), and its end (every final state: completed, failed, cancelled).
WebhookEvent = Literal["start", "output", "completed"]


def check_webhook_url(value: str) -> str:
    """An absolute http(s) URL with a host and no credentials; whether its host
    resolves to a public address is checked at submit, by the hive."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a port out of range or not a number
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    if port == 0 or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError("not a valid URL")
    return value


#: A function's name as OpenAI allows it.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: The most tools one request may declare: agents send dozens; a grammar for each
#: is compiled before the job joins the batch (worker/grammar/), so this bounds that.
MAX_TOOLS = 128
#: OpenAI's limit on ``top_logprobs``.
MAX_TOP_LOGPROBS = 20


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    #: The arguments as OpenAI sends them: a JSON object, encoded as a string.
    arguments: str = Field(max_length=200_000)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value):
        try:
            decoded = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object encoded as a string") from None
        if not isinstance(decoded, dict):
            raise ValueError("must be a JSON object encoded as a string")
        return value


class ToolCall(BaseModel):
    """A call the assistant made, as it comes back in the conversation's history."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    #: None only for an assistant's message that holds tool calls.
    content: str | None = Field(default=None, max_length=200_000)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    #: On a ``tool`` message: the call it answers.
    tool_call_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _check(self) -> "Message":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant's message holds tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be empty only on an assistant's message with tool_calls)")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id belongs on a tool message")
        return self


class FunctionSpec(BaseModel):
    """A tool the model may call, as OpenAI declares it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=10_000)
    #: A JSON Schema of the arguments object; none: any JSON object.
    parameters: dict | None = None
    #: Arguments exactly as the schema says, or a 400 for what cannot be enforced;
    #: otherwise a keyword the grammar engine lacks is left unenforced.
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["function"]
    function: FunctionSpec


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function: exactly one call of it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["function"]
    function: ChosenFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    name: str = Field(default="response", pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=10_000)
    # "schema" shadows a BaseModel attribute: stored as json_schema, sent as "schema".
    json_schema: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """What the answer's text must be: any text, a JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self


class InferenceRequest(BaseModel):
    """``POST /v1/inference`` body. Exactly one of ``prompt`` or ``messages``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(pattern=MODEL_ID_PATTERN)
    revision: str | None = Field(default=None, pattern=REVISION_PATTERN)
    prompt: str | None = Field(default=None, max_length=200_000)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=256)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000)  # 0: no top-k filtering
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    #: OpenAI's penalties on the tokens generated so far: frequency scales with each
    #: token's count, presence applies once; logit_bias adds to a token id's logit.
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    #: transformers' (CTRL's) penalty on every token of the prompt and the output: > 1 discourages repeats.
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    #: Each token's log-probability (the model's, before penalties, bias, masks and
    #: temperature, as vLLM's default), with the ``top_logprobs`` most likely.
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    #: none | auto (the default with tools) | required | one named function.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    #: False: at most one call per answer.
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    #: False: this job neither reuses cached prompt prefixes nor leaves its own for
    #: later jobs (worker/kv/prefix.py), as vLLM's per-request switch.
    prefix_cache: bool = True
    #: Cancel the job when its last follower disconnects (default: keep running, the
    #: two-call pattern lets a client come back with Last-Event-ID).
    cancel_on_disconnect: bool = False
    #: How long the worker keeps the model loaded after this job: seconds or a
    #: duration ("5m"); 0 unloads it right after, negative keeps it until evicted.
    #: None: the worker's --keep-alive.
    keep_alive: float | None = Field(
        default=None,
        # What clients may send; the validator turns a duration string into seconds.
        json_schema_extra={"anyOf": [{"type": "number"}, {"type": "string", "pattern": r"^-?\d+(\.\d+)?(ms|s|m|h)?$"}, {"type": "null"}]},
    )

    #: Called (POST, Standard Webhooks signature) with the job's status JSON on
    #: the events of ``webhook_events_filter``.
    webhook: str | None = Field(default=None, min_length=1, max_length=2048)
    webhook_events_filter: list[WebhookEvent] = Field(default_factory=lambda: ["completed"], min_length=1, max_length=3)

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, value):
        return None if value is None else check_webhook_url(value)

    @field_validator("webhook_events_filter")
    @classmethod
    def _unique_events(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("each event at most once")
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value):
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _check(self) -> "InferenceRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if ".." in self.model or (self.revision and ".." in self.revision):
            raise ValueError("'..' is not allowed in model or revision")
        if any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("each stop sequence must be 1 to 256 characters")
        self._check_tools()
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise ValueError("logit_bias maps token ids (as strings) to a bias from -100 to 100")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("each tool's function name must be unique")
        if self.tools and self.messages is None:
            raise ValueError("tools need 'messages': the model's chat template declares them")
        choice = self.tool_choice
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("tool_choice 'required' or a named function needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named: how the answer may call tools."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class PullRequest(BaseModel):
    """``POST /v1/models/pull`` body: download a model ahead of its first job."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(pattern=MODEL_ID_PATTERN)
    revision: str | None = Field(default=None, pattern=REVISION_PATTERN)

    @model_validator(mode="after")
    def _check(self) -> "PullRequest":
        if ".." in self.model or (self.revision and ".." in self.revision):
            raise ValueError("'..' is not allowed in model or revision")
        return self


class JobState(str, enum.Enum):
    queued = "queued"
    downloading = "downloading"
    loading = "loading"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


FINAL_STATES = frozenset({JobState.completed, JobState.failed, JobState.cancelled})


#: The most inputs one ``POST /v1/embeddings`` may carry, and the longest of them.
MAX_EMBEDDING_INPUTS = 256
MAX_EMBEDDING_INPUT_CHARS = 200_000


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` as the job it becomes (OpenAI's fields Hive reads, and
    Hive's ``revision`` and ``keep_alive``): one vector per input, pooled as the
    model declares it and L2-normalized (worker/model/embedder.py)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(pattern=MODEL_ID_PATTERN)
    revision: str | None = Field(default=None, pattern=REVISION_PATTERN)
    #: One text or a list of them; a list answers in its order (token ids: see hive/openai/embeddings.py).
    input: str | list[str]
    #: How the hive answers the vectors: JSON numbers, or base64 of little-endian float32 (as OpenAI).
    encoding_format: Literal["float", "base64"] = "float"
    #: Keep the first ``dimensions`` of each vector, normalized again (Matryoshka); at
    #: most the model's own size, which only the worker knows.
    dimensions: int | None = Field(default=None, ge=1, le=65_536)
    #: As InferenceRequest's.
    keep_alive: float | None = Field(
        default=None,
        json_schema_extra={"anyOf": [{"type": "number"}, {"type": "string", "pattern": r"^-?\d+(\.\d+)?(ms|s|m|h)?$"}, {"type": "null"}]},
    )

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value):
        return None if value is None else parse_duration(value)

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not 1 <= len(texts) <= MAX_EMBEDDING_INPUTS:
            raise ValueError(f"give 1 to {MAX_EMBEDDING_INPUTS} inputs")
        if any(not text or len(text) > MAX_EMBEDDING_INPUT_CHARS for text in texts):
            raise ValueError(f"each input must be 1 to {MAX_EMBEDDING_INPUT_CHARS} characters (an empty one has no vector)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingRequest":
        if ".." in self.model or (self.revision and ".." in self.revision):
            raise ValueError("'..' is not allowed in model or revision")
        return self

    @property
    def texts(self) -> list[str]:
        """The inputs as a list, in the order their vectors are answered."""
        return [self.input] if isinstance(self.input, str) else list(self.input)
