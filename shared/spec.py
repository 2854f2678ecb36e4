"""The inference job spec: what a client posts and what a worker receives.

Validated with pydantic at the HTTP edge; travels to the worker as plain JSON
(RQ's JSONSerializer), never pickled.
"""

from __future__ import annotations

import enum
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


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)


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
        return self


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
