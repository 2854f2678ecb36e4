"""A TCP proxy in front of a redis-server that reads every command its clients send,
so that a test can act at one exact command: ``RedisProxy(port, at, then)`` calls
``then()`` (stop Redis, say) when a client sends the first command ``at`` matches,
and drops that client's connection instead of forwarding it. Timing-free: the
command has not reached Redis, and the client waits for its answer meanwhile."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


def parse_command(buffer: bytes, start: int) -> tuple[list[bytes], int] | None:
    """One RESP command (an array of bulk strings, as redis-py sends them) at
    ``start``: its arguments and where it ends, or None if it is not all there yet."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    if buffer[start : start + 1] != b"*":
        raise ValueError(f"not a RESP array: {buffer[start:start + 20]!r}")
    count, at, args = int(buffer[start + 1 : line_end]), line_end + 2, []
    for _ in range(count):
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(buffer[at + 1 : line_end])
        end = line_end + 2 + size
        if len(buffer) < end + 2:
            return None
        args.append(buffer[line_end + 2 : end])
        at = end + 2
    return args, at


class RedisProxy:
    def __init__(self, redis_port: int, at: Callable[[list[bytes]], bool], then: Callable[[], None]):
        self.redis_port = redis_port
        self._at, self._then = at, then
        self.caught: list[bytes] | None = None
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="redis-proxy", daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.redis_port))
        except OSError:  # Redis is down: so is this connection
            client.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        buffer = b""
        with client, upstream, contextlib.suppress(OSError):  # OSError: Redis went away, so does the client
            while data := self._recv(client):
                buffer += data
                start, forward = 0, b""
                while (parsed := parse_command(buffer, start)) is not None:
                    args, end = parsed
                    if self._fire(args):
                        upstream.sendall(forward)
                        return  # both connections close with Redis stopped: the client sees it gone
                    forward += buffer[start:end]
                    start = end
                buffer = buffer[start:]
                if forward:
                    upstream.sendall(forward)

    def _fire(self, args: list[bytes]) -> bool:
        with self._lock:
            if self.fired.is_set() or not self._at(args):
                return False
            self.caught = args
            self._then()
            self.fired.set()
            return True

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Redis's answers, as they come; when Redis hangs up, so does the client."""
        while data := self._recv(source):
            try:
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):  # the client may have closed it first
            sink.shutdown(socket.SHUT_RDWR)
