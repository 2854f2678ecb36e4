"""uvicorn's HTTP layer for the hive: httptools, with h11's bound on request heads,
and several processes on one port with the connections spread evenly.

httptools (llhttp, in C) parses requests for a fraction of h11's cost, the largest
single share of a submit's CPU time under h11 (docs/benchmarks.md, Submit). But
uvicorn's httptools protocol buffers a request head of any size, where its h11
protocol stops at ``h11_max_incomplete_event_size``; this subclass restores that
bound: past SERVER_MAX_HEAD_BYTES of head it answers 400 and closes, as h11 does.
Below the bound, ``limits.HeaderLimit`` answers the JSON 431.
"""

from __future__ import annotations

import socket

from uvicorn import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from hive.api.head_limit import SERVER_MAX_HEAD_BYTES


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


class ReusePortProcesses(Multiprocess):
    """uvicorn's process supervisor, with a listening socket of its own for each
    process, all bound to the port with SO_REUSEPORT (as gunicorn's --reuse-port):
    the kernel spreads new connections evenly over them. On uvicorn's one shared
    socket, whichever process wakes first takes a burst of keep-alive connections
    and keeps them: in the submit benchmark one process of two then did nearly all
    the work (bench/submit.py)."""

    def __init__(self, config: Config):
        super().__init__(config, sockets=[])

    @property
    def sockets(self) -> list[socket.socket]:
        # Read once for each process the supervisor starts (uvicorn's
        # Process(config, self.sockets)), first or replacing one that died; the
        # socket closes here with its Process object.
        return [self._bind()]

    @sockets.setter
    def sockets(self, value: list[socket.socket]) -> None:
        pass  # Multiprocess.__init__ stores its shared sockets: here there are none

    def check_port(self) -> None:
        """Raises OSError now if the port is taken, rather than in every process."""
        self._bind().close()

    def _bind(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock
