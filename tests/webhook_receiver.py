"""A real webhook receiver for the tests: a threaded HTTP server on a free port that
records every delivery it gets, and answers each path from a script of statuses."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() at receipt

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> dict:
        return json.loads(self.body)

    def verify(self, secret: str) -> dict:
        """What a receiver does: standardwebhooks checks signature and timestamp."""
        return Webhook(secret).verify(self.body, self.headers)


class Receiver:
    def __init__(self):
        self.deliveries: list[Delivery] = []
        self._answers: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._changed:
                    script = receiver._answers.get(self.path) or []
                    status, headers = script.pop(0) if script else (200, {})
                    receiver.deliveries.append(Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                    receiver._changed.notify_all()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet: the tests say what they saw
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def answer(self, path: str, *answers: int | tuple[int, dict[str, str]]) -> None:
        """The next deliveries to ``path`` get these statuses (with headers), then 200s."""
        with self._changed:
            self._answers[path] = [a if isinstance(a, tuple) else (a, {}) for a in answers]

    def at(self, path: str) -> list[Delivery]:
        with self._changed:
            return [d for d in self.deliveries if d.path == path]

    def wait_for(self, path: str, count: int, timeout_s: float = 30) -> list[Delivery]:
        """The deliveries to ``path`` once there are at least ``count``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len([d for d in self.deliveries if d.path == path]) >= count, timeout_s):
                raise TimeoutError(f"{count} deliveries to {path} not within {timeout_s} s: got {self.at(path)}")
        return self.at(path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
