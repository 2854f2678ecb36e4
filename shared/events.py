"""The job event schema: one frozen dataclass per SSE event type, and its wire forms.

An event travels three ways, all built here so hive and worker cannot drift apart:
- the replay log (a Redis Stream entry ``<seq>-0`` with fields ``e`` = type, ``d`` = JSON;
  once the job has ended, each run of token events is compacted into one entry:
  ``COMPACT_TOKENS``),
- the live pub/sub message ``"<seq>\\n<type>\\n<JSON>"`` (split, never parsed, by the relay),
- the SSE frame ``id: <seq>\\nevent: <type>\\ndata: <JSON>\\n\\n``.
The JSON object always carries ``"event": <type>`` as its first field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

DONE_FRAME = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Event:
    type: ClassVar[str]

    def to_json(self) -> str:
        # Fields are flat: vars() is asdict() without its deep copy (this runs per token).
        return json.dumps({"event": self.type, **vars(self)}, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Queued(Event):
    type = "queued"
    position: int


@dataclass(frozen=True)
class Download(Event):
    type = "download"
    file: str | None
    bytes_downloaded: int
    bytes_total: int
    files_done: int
    files_total: int
    cached: bool = False


@dataclass(frozen=True)
class Loading(Event):
    type = "loading"
    layers_loaded: int
    layers_total: int
    vram_mb: float
    device: str
    stage: str = "loading_to_vram"


@dataclass(frozen=True)
class Ready(Event):
    type = "ready"
    load_ms: float
    warm: bool
    stage: str = "ready"


@dataclass(frozen=True)
class Started(Event):
    type = "started"
    job_id: str
    model: str
    worker: str
    started_at: float


@dataclass(frozen=True)
class Retry(Event):
    type = "retry"
    attempt: int
    reason: str


@dataclass(frozen=True)
class Token(Event):
    """The text token ``i`` made final (possibly "", held back for a stop sequence
    or a character's later bytes). ``logprobs``, when the job asked for them:
    OpenAI's item for the token, ``{token, logprob, bytes, top_logprobs}``."""

    type = "token"
    t: str
    i: int
    logprobs: dict | None = None

    def to_json(self) -> str:
        # Left out when None: most jobs never ask, and this runs per token.
        fields = {"event": self.type, "t": self.t, "i": self.i}
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class ToolCallDelta(Event):
    """Part of the answer's tool call number ``index``: its first part carries the
    call's ``id`` and function ``name`` (``arguments`` may be ""); the ones after
    carry only more of ``arguments``. Joined, the fragments are exactly the final
    arguments JSON, as the model wrote it under the grammar."""

    type = "tool_call"
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class End(Event):
    type = "end"
    tokens_out: int
    decode_time_ms: float
    ttft_ms: float
    stop_reason: str  # max_tokens | eos | stop_sequence | tool_calls | cancelled
    #: Prompt tokens found in the worker's prefix cache rather than computed.
    cached_tokens: int = 0


@dataclass(frozen=True)
class Error(Event):
    type = "error"
    code: str
    message: str


@dataclass(frozen=True)
class Gap(Event):
    """Events ``first`` .. ``last`` are gone: Redis failed over to a replica that
    had not received them (replication is asynchronous). Never stored: the hive
    sends it, with id ``last``, where a follower's next event would skip ids. The
    job goes on (or has ended: its terminal event follows)."""

    type = "gap"
    first: int
    last: int


TERMINAL_TYPES = frozenset({End.type, Error.type})
#: Codes of an ``error`` that ends a stream, not its job (sent without an id): the
#: hive lost Redis or is shutting down. The job goes on; resume with Last-Event-ID.
STREAM_ERROR_CODES = frozenset({"REDIS_UNAVAILABLE", "SHUTTING_DOWN"})


def stream_id(seq: int) -> str:
    """Replay-log entry id for event number ``seq`` (1-based): explicit ids make the
    SSE ``id:`` a plain integer and make a duplicate append fail loudly."""
    return f"{seq}-0"


def seq_of(entry_id: str | bytes) -> int:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


#: A compacted run of token events: one log entry, with the id of the run's last token,
#: ``{"event": "tokens", "i": <first i>, "t": [<text>, ...]}``.
TOKENS = "tokens"

# Compacts a finished job's replay log: each run of consecutive token entries (ids and
# token numbers both without a hole) becomes one TOKENS entry; other entries stay as
# they are, ids included (a token with its logprobs too: a run holds text only). A token entry costs Redis ~69 bytes, most of it per-entry
# overhead, and a finished job's log lives as long as its record (the job TTL): one
# entry per run is about 10× less, and ``log_events`` gives a late follower the same
# ids and JSON, so no reader can tell. Atomic (one script), so a follower reading the
# log meanwhile sees it whole before or after. Returns the entries saved.
COMPACT_TOKENS = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local out, run = {}, nil
local function close_run()
  if run then
    out[#out + 1] = {run.id, 'tokens', cjson.encode({event = 'tokens', i = run.i, t = run.t})}
    run = nil
  end
end
for _, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  local kind, data = fields[2], fields[4]
  local seq = tonumber(string.match(id, '^(%d+)'))
  local token = kind == 'token' and cjson.decode(data) or nil
  if token and token.logprobs == nil then
    if run and seq == run.seq + 1 and token.i == run.i + #run.t then
      run.t[#run.t + 1] = token.t
      run.id, run.seq = id, seq
    else
      close_run()
      run = {id = id, seq = seq, i = token.i, t = {token.t}}
    end
  else
    close_run()
    out[#out + 1] = {id, kind, data}
  end
end
close_run()
if #out == #entries then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
for _, entry in ipairs(out) do
  redis.call('XADD', KEYS[1], entry[1], 'e', entry[2], 'd', entry[3])
end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return #entries - #out
"""


def log_events(entry_id: str | bytes, type_: str, data: str) -> list[tuple[int, str, str]]:
    """The events one replay-log entry holds, as ``(seq, type, JSON)``: the entry
    itself, or a compacted run of tokens with each token's own id and JSON."""
    seq = seq_of(entry_id)
    if type_ != TOKENS:
        return [(seq, type_, data)]
    run = json.loads(data)
    first = seq - len(run["t"]) + 1
    return [(first + k, Token.type, Token(text, run["i"] + k).to_json()) for k, text in enumerate(run["t"])]


def live_message(seq: int, type_: str, data: str) -> str:
    return f"{seq}\n{type_}\n{data}"


def parse_live_message(message: str | bytes) -> tuple[int, str, str]:
    if isinstance(message, bytes):
        message = message.decode()
    seq, type_, data = message.split("\n", 2)
    return int(seq), type_, data


def sse_frame(seq: int, type_: str, data: str) -> bytes:
    return f"id: {seq}\nevent: {type_}\ndata: {data}\n\n".encode()


def gap_frame(first: int, last: int) -> bytes:
    return sse_frame(last, Gap.type, Gap(first, last).to_json())
