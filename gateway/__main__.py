"""`python -m gateway`: settings, logging, Redis and the inference channel, then uvicorn."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import uvicorn

from gateway.app import create_app
from gateway.replicas import InferenceReplicas
from gateway.settings import GatewaySettings
from services.common.channels import open_channel
from services.common.logs import setup_logging
from services.common.redis import open_redis

log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
    # Unwound by the app's lifespan shutdown: LIFO, each step runs even if one before failed.
    resources = AsyncExitStack()
    redis = await open_redis(settings.redis_url, resources)
    inference = InferenceReplicas.from_settings(settings, open_channel)
    optional = {}
    for name in ("analytics", "experiments", "activelearning", "training"):
        addr = getattr(settings, f"{name}_addr")
        if addr:
            optional[f"{name}_channel"] = await resources.enter_async_context(open_channel(addr))

    app = create_app(
        settings,
        redis=redis,
        inference=inference,
        **optional,
        resources=resources,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging set up in main()
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        timeout_keep_alive=int(settings.keep_alive_timeout_seconds),
        # Headers arrive whole and small, or the connection is dropped (h11's bound).
        h11_max_incomplete_event_size=64 * 1024,
    )
    log.info(
        "gateway starting",
        extra={
            "host": settings.host,
            "port": settings.port,
            "inference": settings.inference_addresses or settings.inference_addr,
        },
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
