"""uvicorn's HTTP layer for the hive: httptools, with h11's bound on request heads.

httptools (llhttp, in C) parses requests for a fraction of h11's cost, the largest
single share of a submit's CPU time under h11 (docs/benchmarks.md, Submit). But
uvicorn's httptools protocol buffers a request head of any size, where its h11
protocol stops at ``h11_max_incomplete_event_size``; this subclass restores that
bound: past SERVER_MAX_HEAD_BYTES of head it answers 400 and closes, as h11 does.
Below the bound, ``limits.HeaderLimit`` answers the JSON 431.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .limits import SERVER_MAX_HEAD_BYTES


class BoundedHeadHttpTools(HttpToolsProtocol):
    _in_head = False
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Counted after parsing: a chunk that completed the head is not counted, one
        # that left it incomplete was all head (but for the tail of a pipelined
        # request before it: at most one chunk too many, well under the bound's scale).
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > SERVER_MAX_HEAD_BYTES:
                self.send_400_response("Request head too large.")


#: uvicorn.Config options for every hive server (hive serve, hive up).
SERVER_OPTIONS = {"http": BoundedHeadHttpTools, "loop": "uvloop", "h11_max_incomplete_event_size": SERVER_MAX_HEAD_BYTES}
