"""``GET /v1/webhooks/default/secret``: the caller's webhook signing secret (hive/webhooks/secrets.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hive.api.state import hive_of


async def default_secret(request: Request) -> Response:
    """The caller's signing secret: ``{"key": "whsec_…"}`` (as Replicate's API)."""
    hive = hive_of(request)
    principal = hive.auth.authenticate(request)
    return JSONResponse({"key": await hive.webhook_secrets.for_owner(principal.owner)})


routes = [Route("/v1/webhooks/default/secret", default_secret, methods=["GET"])]
