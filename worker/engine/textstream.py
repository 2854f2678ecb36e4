"""Token ids → text, as it streams: incremental decoding and stop sequences.

Hand-written because transformers' TextStreamer prints or queues whole words from
another thread; we need, per token and in the generating thread, exactly the text
that became final with that token.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Decodes one token at a time without ever cutting a multi-byte character.

    The technique of text-generation-inference: decode a small window of recent
    ids twice (with and without the newest ids) and emit the difference only when
    it does not end in an incomplete UTF-8 sequence. Seeding the window with the
    prompt's last ids keeps SentencePiece's leading spaces right.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], context: int = 5):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-context:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (bytes that never formed a character)."""
        rest = self._decode(self.ids[self.prefix_offset :])[len(self._decode(self.ids[self.prefix_offset : self.read_offset])) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest


class StopMatcher:
    """Cuts the output at the first stop sequence and holds back text that may be
    the start of one, so a client never sees any part of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str, final: bool) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop sequence was hit)."""
        buffer = self.pending + delta
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buffer[:cut], True
        if final or not self.stops:
            self.pending = ""
            return buffer, False
        hold = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self.pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False
