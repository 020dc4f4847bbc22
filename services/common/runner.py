"""The one `main` every gRPC service runs: settings in, serve until SIGTERM, clean up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.logs import setup_logging
from services.common.redis import EmbeddedRedis, connect
from services.common.server import Server, run_until_signal, start_metrics_endpoint
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)
D = TypeVar("D")


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


async def run_service(
    settings: S,
    create_server: Callable[[S, aioredis.Redis], tuple[Server, D]],
    *,
    warm_up: Callable[[D], Awaitable[Any]] | None = None,
    close: Callable[[D], Any] | None = None,
) -> None:
    """Connect Redis (REDIS_URL, else an embedded server), start the gRPC server as
    NOT_SERVING, warm up (e.g. load the model), mark it SERVING, serve until a signal."""
    setup_logging(settings.log_level)
    embedded = None if settings.redis_url else EmbeddedRedis()
    redis = connect(settings.redis_url or embedded.url)  # type: ignore[union-attr]
    server, domain = create_server(settings, redis)
    start_metrics_endpoint(settings)
    await server.start()
    try:
        await wait_for_redis(redis)
        if warm_up is not None:
            await warm_up(domain)
        await server.set_ready()
        await run_until_signal(server)
    finally:
        if close is not None:
            close(domain)
        await redis.aclose()
        if embedded:
            embedded.close()
