"""The admin CLI's connection to a hive: JSON answers, and every failure as one
readable line with the exit code of ``hive run`` (2 rejected, 3 unreachable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text


class HiveApi:
    """One command's connection to a hive: answers as JSON, failures as the
    client's ClientError carrying the exit code."""

    def __init__(self, url: str, api_key: str):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=60.0))

    def call(self, method: str, path: str, not_found: str = "", answers: tuple[int, ...] = (), **kwargs) -> dict:
        """``not_found``: the message for a 404; ``answers``: error statuses whose
        JSON is an answer (the 503 of an unhealthy ``/health``)."""
        import httpx

        from hive.client.run import (
            EXIT_REJECTED,
            EXIT_UNREACHABLE,
            ClientError,
            api_error_message,
        )

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ClientError(f"cannot reach the hive at {self.url} ({e}); is `hive serve` or `hive up` running?", EXIT_UNREACHABLE) from e
        if response.status_code < 400 or response.status_code in answers:
            return response.json()
        if response.status_code == 404 and not_found:
            raise ClientError(not_found, EXIT_REJECTED)
        if response.status_code >= 500:
            raise ClientError(f"the hive cannot serve: {api_error_message(response)}", EXIT_UNREACHABLE)
        raise ClientError(f"rejected: {api_error_message(response)}", EXIT_REJECTED)

    def close(self) -> None:
        self.http.close()


def execute(url: str, api_key: str, action: Callable[[HiveApi, Console], Optional[int]]) -> None:
    """Runs one command against the hive and exits with its code; a failure is one
    readable line on stderr, never a traceback."""
    from hive.client.run import ClientError

    err = Console(stderr=True)
    api = HiveApi(url, api_key)
    try:
        code = action(api, err) or 0
    except ClientError as e:
        err.print(Text(str(e), style="red"))
        code = e.exit_code
    finally:
        api.close()
    raise typer.Exit(code)
