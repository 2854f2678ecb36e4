"""A job's events in OpenAI's shapes: one ``Choice`` per job (``n`` jobs for ``n``
choices), filled from its events, then written as a chat or text completion, or
as the chunks of a stream.

Logprobs arrive per token as OpenAI's chat item (``{token, logprob, bytes,
top_logprobs}``, the model's raw distribution, as vLLM's default); the text
completions API lists them in its older column form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The job's ``end.stop_reason`` as OpenAI's ``finish_reason``; ``cancelled`` is none
#: of OpenAI's: such a job ends the answer with an error.
FINISH_REASONS = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_calls": "tool_calls"}


@dataclass(frozen=True)
class Flavour:
    """What tells a chat completion from a text completion in OpenAI's shapes."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool


CHAT = Flavour("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Flavour("cmpl-", "text_completion", "text_completion", chat=False)


def text_logprobs(items: list[dict], offset: int) -> dict:
    """The completions API's logprobs: columns, with each token's offset in the text."""
    tokens, values, tops, offsets = [], [], [], []
    for item in items:
        tokens.append(item["token"])
        values.append(item["logprob"])
        tops.append({top["token"]: top["logprob"] for top in item["top_logprobs"]})
        offsets.append(offset)
        offset += len(item["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Choice:
    """One job's answer, as its events arrive."""

    index: int
    job_id: str
    pieces: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] | None = None
    #: The terminal event: ``(type, fields)``.
    end: tuple[str, dict] | None = None
    #: A Redis failover lost some of its events: the record's copy is read instead.
    lost: bool = False

    def add(self, type_: str, event: dict) -> None:
        if type_ == "token":
            self.pieces.append(event["t"])
            if "logprobs" in event:
                self.logprobs = (self.logprobs or []) + [event["logprobs"]]
        elif type_ == "tool_call":
            if event["id"] is not None:
                self.tool_calls.append({"id": event["id"], "type": "function", "function": {"name": event["name"], "arguments": ""}})
            self.tool_calls[event["index"]]["function"]["arguments"] += event["arguments"]
        elif type_ == "gap":
            self.lost = True
        elif type_ in ("end", "error"):
            self.end = (type_, event)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def as_openai(self, flavour: Flavour) -> dict:
        finish_reason = FINISH_REASONS[self.end[1]["stop_reason"]]
        if not flavour.chat:
            logprobs = text_logprobs(self.logprobs, 0) if self.logprobs is not None else None
            return {"index": self.index, "text": self.text, "logprobs": logprobs, "finish_reason": finish_reason}
        message: dict = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
            message["content"] = self.text or None
        logprobs = {"content": self.logprobs} if self.logprobs is not None else None
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk_choice(flavour: Flavour, index: int, type_: str, event: dict, offset: int) -> dict | None:
    """A stream chunk's choice for one event (None when it says nothing to OpenAI's
    clients); ``offset``: the choice's text so far (the text API's logprob offsets)."""
    logprobs = event.get("logprobs")
    if type_ == "token":
        if not event["t"] and logprobs is None:
            return None
        if not flavour.chat:
            column = text_logprobs([logprobs], offset) if logprobs is not None else None
            return {"index": index, "text": event["t"], "logprobs": column, "finish_reason": None}
        delta = {"content": event["t"]}
        return {"index": index, "delta": delta, "logprobs": {"content": [logprobs]} if logprobs else None, "finish_reason": None}
    if type_ == "tool_call" and flavour.chat:
        call: dict = {"index": event["index"]}
        if event["id"] is not None:
            call |= {"id": event["id"], "type": "function", "function": {"name": event["name"], "arguments": event["arguments"]}}
        else:
            call["function"] = {"arguments": event["arguments"]}
        return {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
    return None


def final_chunk_choice(flavour: Flavour, index: int, stop_reason: str) -> dict:
    if not flavour.chat:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": FINISH_REASONS[stop_reason]}
    return {"index": index, "delta": {}, "logprobs": None, "finish_reason": FINISH_REASONS[stop_reason]}


def role_chunk_choice(index: int) -> dict:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
