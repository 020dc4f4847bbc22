"""`python -m gateway`: settings, logging, Redis and the inference channel, then uvicorn."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.common.channels import open_channel
from services.common.logs import setup_logging
from services.common.redis import EmbeddedRedis, connect

log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
    # Closed by the app's lifespan shutdown: LIFO, each step runs even if one before failed.
    resources = AsyncExitStack()
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis()
        resources.callback(embedded.close)
    redis = connect(settings.redis_url or embedded.url)  # type: ignore[union-attr]
    resources.push_async_callback(redis.aclose)
    channel = open_channel(settings.inference_addr)
    resources.push_async_callback(channel.close)
    optional = {}
    for name in ("analytics", "experiments", "activelearning", "training"):
        addr = getattr(settings, f"{name}_addr")
        if addr:
            optional[f"{name}_channel"] = open_channel(addr)
            resources.push_async_callback(optional[f"{name}_channel"].close)

    app = create_app(
        settings,
        redis=redis,
        inference_channel=channel,
        **optional,
        on_shutdown=resources.aclose,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging set up in main()
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )
    log.info(
        "gateway starting",
        extra={"host": settings.host, "port": settings.port, "inference": settings.inference_addr},
    )
    try:
        # On SIGTERM/SIGINT uvicorn drains requests, runs the lifespan shutdown, then
        # re-raises the signal: nothing after this line runs in that case.
        await uvicorn.Server(config).serve()
    finally:
        await resources.aclose()  # failures before the lifespan ran; else a no-op


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.log_level)
    if settings.admin_key is None:
        log.warning("LORAPLEX_ADMIN_KEY is not set: the admin API refuses every request")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
