"""Request-head limits, enforced before routing.

Bodies are bounded where they are read (hive/api/bodies.py). Headers arrive
whole before the app sees the request: the server bounds what it buffers
(SERVER_MAX_HEAD_BYTES, answering a bare 400 beyond it: hive/server.py), and
below that bound this middleware answers a JSON 431 like every other API error.
Starlette has no header-size setting, hence a few lines of ASGI.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from hive.api.errors import error_response

#: What the app accepts in all header names and values of one request.
MAX_HEADER_BYTES = 16 * 1024
#: What uvicorn buffers of a request head at most (headers beyond it: 400, connection closed).
SERVER_MAX_HEAD_BYTES = 64 * 1024


class HeaderLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                response = error_response(
                    431, "HEADERS_TOO_LARGE", f"request headers are limited to {self.max_bytes} bytes in all; these have {size}"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
