"""The one `main` every gRPC service runs: settings in, serve until SIGTERM, clean up.

Every resource a service opens (the embedded Redis, the Redis client, channels, exporters,
listeners) is registered on one AsyncExitStack as it is opened. SIGTERM unwinds that stack
in reverse order: the server drains its in-flight RPCs first (it is registered last), then
exporters flush what is queued while the channels they send on are still open, then the
channels and Redis close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.logs import setup_logging
from services.common.redis import open_redis
from services.common.server import Server, start_metrics_endpoint, stop_on_signal
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True)
class Service:
    """What a service's entry point opens: its server (not started yet) and the warm-up
    to run once the server listens (NOT_SERVING) and Redis answers, e.g. loading a model."""

    server: Server
    warm_up: Callable[[], Awaitable[Any]] | None = None


# Builds the service on Redis, registering on `resources` the release of whatever it opens
# (channels, exporters, background tasks) right after opening it.
OpenService = Callable[[S, aioredis.Redis, AsyncExitStack], Awaitable[Service]]


async def wait_for_redis(client: aioredis.Redis, timeout: float = 60.0) -> None:
    """Stay NOT_SERVING until Redis answers (it may still be starting or loading its AOF)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await client.ping()
            return
        except RedisConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("waiting for redis")
            await asyncio.sleep(0.5)


async def until_stopped(work: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it). True when `work` finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():  # stopped while starting, e.g. while the model loads
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # re-raise a failed start-up
    return True


async def run_service(settings: S, open_service: OpenService[S]) -> None:
    """Connect Redis (REDIS_URL, else an embedded server), open the service, start its gRPC
    server as NOT_SERVING, warm up, mark it SERVING, serve until a signal, then unwind."""
    setup_logging(settings.log_level)
    stop = stop_on_signal()
    async with AsyncExitStack() as resources:
        redis = await open_redis(settings.redis_url, resources)
        service = await open_service(settings, redis, resources)
        start_metrics_endpoint(settings)
        await service.server.start()
        # Registered last, so released first: in-flight RPCs finish (and queue their
        # forwards) before anything they use is closed.
        resources.push_async_callback(service.server.stop)

        async def get_ready() -> None:
            await wait_for_redis(redis)
            if service.warm_up is not None:
                await service.warm_up()
            await service.server.set_ready()

        if await until_stopped(get_ready(), stop):
            await stop.wait()
        log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
