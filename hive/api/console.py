"""The web console served at ``/``: one self-contained page (``static/console.html``,
vanilla JS and CSS, nothing fetched from elsewhere) that submits a prompt, follows
its stream with an ``EventSource`` and polls the workers and the queue.

The page holds no data, so it wants no API key; everything it shows comes from the
API with the key the user types in (kept in the browser's ``localStorage``)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

CONSOLE_PAGE = Path(__file__).parent / "static" / "console.html"

#: The page runs its own inline script and style and talks only to this hive;
#: nothing may frame it, load other code or send data elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def console_page(request: Request) -> Response:
    return FileResponse(
        CONSOLE_PAGE,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


routes = [Route("/", console_page, methods=["GET"])]
