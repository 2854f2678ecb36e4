"""What the endpoints share, and the one way they reach it: ``hive_of(request)``.

Routers never import the app (hive/app.py wires them); they reach its state through
this typed accessor, as vLLM's OpenAI routers do.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from hive.api.auth import Auth
from hive.api.fleet import Fleet
from hive.jobs.quotas import Quotas
from hive.jobs.service import JobService
from hive.streams.relay import EventRelay
from hive.streams.sse import StallWatchdog
from hive.webhooks.secrets import WebhookSecrets
from shared.settings import Settings


@dataclass
class Hive:
    """One hive process's services, built once in the app's lifespan."""

    settings: Settings
    jobs: JobService
    relay: EventRelay
    auth: Auth
    fleet: Fleet
    stalls: StallWatchdog
    quotas: Quotas
    webhook_secrets: WebhookSecrets


def hive_of(request: Request) -> Hive:
    """The hive serving ``request`` (set on ``app.state.hive`` by hive/app.py)."""
    return request.app.state.hive
