"""The hive application: Starlette, one Redis client pair and one event relay per process."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from hive.api.admin import routes as admin_routes
from hive.api.auth import Auth
from hive.api.console import routes as console_routes
from hive.api.error_handlers import EXCEPTION_HANDLERS
from hive.api.fleet import Fleet
from hive.api.head_limit import HeaderLimit
from hive.api.inference import routes
from hive.api.metrics import app_metrics
from hive.api.metrics import routes as metrics_routes
from hive.api.state import Hive
from hive.api.webhook_secret import routes as webhook_routes
from hive.jobs.quotas import Quotas
from hive.jobs.reaper import Reaper
from hive.jobs.service import JobService
from hive.openai.embeddings import routes as embedding_routes
from hive.openai.responses import routes as responses_routes
from hive.openai.routes import routes as openai_routes
from hive.streams.relay import EventRelay
from hive.streams.sse import StallWatchdog
from hive.webhooks.delivery import WebhookSender
from hive.webhooks.secrets import WebhookSecrets
from shared.clock import RedisClock
from shared.connections import async_client, sync_client, wait_for_redis
from shared.settings import Settings

log = logging.getLogger("hive")


def create_app(settings: Settings, hub_root: Path | None = None) -> Starlette:
    """``/hub`` is a pull-through mirror of ``settings.hub_upstream`` (none when that is
    empty); with ``hub_root`` it serves the model folders under it instead."""
    hub = None
    hub_routes = []
    if hub_root is not None:
        from hive.hub.folders import FolderHub

        # `hive up` serves its demo model from the folder rather than seeding a cache:
        # its worker shares the user's HF cache, where a seeded model would show no
        # download, and the demo must run with no upstream at all.
        hub_routes = [Mount("/hub", app=FolderHub(hub_root).app())]
    elif settings.hub_upstream:
        from huggingface_hub import constants

        from hive.hub.mirror import PullThroughMirror

        hub = PullThroughMirror(settings.hub_upstream, settings.hub_cache or constants.HF_HUB_CACHE)
        hub_routes = [Mount("/hub", app=hub.app())]

    quotas = (
        Quotas.from_file(settings.key_limits_file, settings.key_rate_per_min, settings.key_max_in_flight)
        if settings.key_limits_file
        else Quotas(settings.key_rate_per_min, settings.key_max_in_flight)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        connection = async_client(settings.redis_url, decode_responses=True)
        sync_connection = sync_client(settings.redis_url)
        relay_connection = async_client(settings.redis_url, decode_responses=True)
        relay = EventRelay(relay_connection)
        # Started before Redis answers, the hive serves anyway (/health: 503) and says what it waits for.
        await relay.start(lambda: anyio.to_thread.run_sync(wait_for_redis, sync_connection, settings.redis_url, "hive", log))
        # Redis's clock, which the workers keep time by too (measured as soon as Redis answers).
        clock = RedisClock(sync_connection)
        clock.start()
        metrics = app_metrics(app)
        jobs = JobService(settings, connection, sync_connection, clock, on_end=metrics.job_ended)
        reaper = Reaper(connection, jobs)
        reaper.start()
        stalls = StallWatchdog()
        stalls.start()
        fleet = Fleet(connection, clock, settings.queue, str(hub.cache.root) if hub is not None else None)
        webhook_secrets = WebhookSecrets(connection)
        webhook_sender = WebhookSender(settings, connection, clock, webhook_secrets)
        webhook_sender.start()
        app.state.hive = Hive(settings, jobs, relay, Auth(settings, clock), fleet, stalls, quotas, webhook_secrets)
        log.info("hive ready: %r", settings)
        try:
            yield
        finally:
            await reaper.stop()
            await webhook_sender.stop()
            await stalls.stop()
            await relay.stop()
            await anyio.to_thread.run_sync(clock.stop)
            await relay_connection.aclose()
            await connection.aclose()
            sync_connection.close()
            if hub is not None:  # a mounted app's own lifespan never runs
                await hub.aclose()

    return Starlette(
        routes=[*routes, *webhook_routes, *openai_routes, *responses_routes, *embedding_routes, *admin_routes, *metrics_routes, *console_routes, *hub_routes],
        middleware=[Middleware(HeaderLimit)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
