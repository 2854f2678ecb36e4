"""The hive application: Starlette, one Redis client pair and one event relay per process."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from shared.connections import async_client, sync_client
from shared.settings import Settings

from .api import routes
from .auth import Auth
from .errors import EXCEPTION_HANDLERS
from .jobs import JobService
from .limits import HeaderLimit
from .reaper import Reaper
from .relay import EventRelay

log = logging.getLogger("hive")


@dataclass
class Hive:
    """What the endpoints share, on ``app.state.hive``."""

    settings: Settings
    jobs: JobService
    relay: EventRelay
    auth: Auth


def create_app(settings: Settings, hub_root: Path | None = None) -> Starlette:
    """``hub_root``: serve the model folders under it as a hub endpoint at ``/hub``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        connection = async_client(settings.redis_url, decode_responses=True)
        sync_connection = sync_client(settings.redis_url)
        relay = EventRelay(async_client(settings.redis_url, decode_responses=True))
        await relay.start()
        jobs = JobService(settings, connection, sync_connection)
        reaper = Reaper(connection, jobs)
        reaper.start()
        app.state.hive = Hive(settings, jobs, relay, Auth(settings))
        log.info("hive ready: %r", settings)
        try:
            yield
        finally:
            await reaper.stop()
            await relay.stop()
            await connection.aclose()
            sync_connection.close()

    hub_routes = []
    if hub_root is not None:
        from .hub_mirror import HubMirror

        hub_routes = [Mount("/hub", app=HubMirror(hub_root).app())]
    return Starlette(
        routes=[*routes, *hub_routes],
        middleware=[Middleware(HeaderLimit)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
