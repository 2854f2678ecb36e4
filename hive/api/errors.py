"""The error every endpoint raises, and the body it is answered with: ``{"error": {"code", "message"}}``.

A leaf: it imports nothing of the hive's, so any module may raise an ``ApiError``.
The table that maps other failures to answers is hive/api/error_handlers.py.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A refusal with its HTTP status, a stable ``code`` and a message for people."""

    def __init__(self, status: int, code: str, message: str, details: list | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def error_response(status: int, code: str, message: str, details: list | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)
