"""Reading tool calls out of the answer's text as it streams.

The grammar (worker/grammar/grammar.py) makes every call well-formed in the
model's format, so reading it back is a small state machine, not a guess:
text until the format's trigger, then per call its head (the function's name),
its arguments (a JSON object, scanned for its closing brace), and its closer.
Arguments go out as the raw text the grammar accepted, fragment by fragment, so
that the fragments joined are exactly the final arguments: never re-serialized
partial JSON (the bug peers keep meeting).

A thinking model's reasoning (up to ``</think>``) is text: a call written while
thinking is not a call.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from shared.events import ToolCallDelta
from worker.grammar.tool_formats import ToolFormat

#: A call's head may not grow past this without matching: the text is then not a
#: call (only possible without a grammar), and goes out as text.
MAX_HEAD_CHARS = 256


def call_id() -> str:
    """An id like OpenAI's: ``call_`` and 24 random letters and digits."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCallRecord:
    id: str
    name: str
    arguments: str = ""

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _ObjectScanner:
    """Where a JSON object ends in text fed piece by piece: depth outside strings."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False

    def feed(self, text: str) -> int:
        """How many characters of ``text`` belong to the object; len(text) while it goes on."""
        for k, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
                self.started = True
            elif c in "}]":
                self.depth -= 1
                if self.started and self.depth == 0:
                    return k + 1
        return len(text)

    @property
    def closed(self) -> bool:
        return self.started and self.depth == 0


@dataclass
class ToolCallStream:
    """Feeds on the answer's final text; gives back the text that is content and
    the tool-call deltas. ``thinking``: "open" | "may" | "" (as the grammar's)."""

    fmt: ToolFormat
    thinking: str = ""
    calls: list[ToolCallRecord] = field(default_factory=list)
    _state: str = "text"  # thinking | text | head | arguments | closer | between
    _buffer: str = ""
    _scanner: _ObjectScanner | None = None

    def __post_init__(self):
        fmt = self.fmt
        before, after = fmt.head.split("{name}")
        self._first_head = re.compile(re.escape((fmt.begin + fmt.opener + before)[len(fmt.trigger) :]) + r"([A-Za-z0-9_-]{1,64})" + re.escape(after))
        self._next_head = re.compile(re.escape(fmt.separator + fmt.opener + before) + r"([A-Za-z0-9_-]{1,64})" + re.escape(after))
        if self.thinking == "open":
            self._state = "thinking"

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._advance(content, deltas, final):
            pass
        if final and self._state in ("text", "thinking") and self._buffer:
            content.append(self._buffer)
            self._buffer = ""
        return "".join(content), deltas

    def _advance(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        """One move of the state machine; whether to try again."""
        buffer = self._buffer
        if self._state == "thinking":
            end = buffer.find("</think>")
            if end < 0:
                keep = _partial_suffix(buffer, "</think>")
                content.append(buffer[: len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep :]
                return False
            content.append(buffer[: end + len("</think>")])
            self._buffer = buffer[end + len("</think>") :]
            self._state = "text"
            return True
        if self._state == "text":
            if self.thinking == "may" and not self.calls and buffer.startswith("<think>"):
                self._state = "thinking"
                return True
            if self.thinking == "may" and "<think>".startswith(buffer) and buffer and not final:
                return False  # may be the start of "<think>"
            trigger = self.fmt.trigger
            start = buffer.find(trigger)
            if start < 0:
                keep = _partial_suffix(buffer, trigger)
                content.append(buffer[: len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep :]
                return False
            content.append(buffer[:start])
            self._buffer = buffer[start + len(trigger) :]
            self._state = "head"
            return True
        if self._state in ("head", "between"):
            pattern = self._first_head if self._state == "head" else self._next_head
            match = pattern.match(buffer)
            if match is None:
                if self._state == "head" and len(buffer) > MAX_HEAD_CHARS:  # not a call after all
                    content.append(self.fmt.trigger + buffer)
                    self._buffer, self._state = "", "text"
                return False
            record = ToolCallRecord(call_id(), match.group(1))
            self.calls.append(record)
            deltas.append(ToolCallDelta(len(self.calls) - 1, record.id, record.name, ""))
            self._buffer = buffer[match.end() :]
            self._state, self._scanner = "arguments", _ObjectScanner()
            return True
        if self._state == "arguments":
            if not buffer:
                return False
            taken = self._scanner.feed(buffer)
            fragment = buffer[:taken]
            record = self.calls[-1]
            record.arguments += fragment
            deltas.append(ToolCallDelta(len(self.calls) - 1, None, None, fragment))
            self._buffer = buffer[taken:]
            if self._scanner.closed:
                self._state = "closer"
                return True
            return False
        if self._state == "closer":
            closer = self.fmt.closer
            if len(buffer) < len(closer):
                return False
            self._buffer = buffer[len(closer) :]
            self._state = "between"
            return True
        return False

    @property
    def openai_calls(self) -> list[dict]:
        return [call.as_openai() for call in self.calls]

    def record_json(self) -> str:
        return json.dumps(self.openai_calls, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``: held back, it may become one."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
