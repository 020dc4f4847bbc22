"""The FastAPI application, built from its dependencies (nothing global, nothing opened)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
import redis.asyncio as aioredis
from fastapi import FastAPI

from gateway import (
    active_learning_routes,
    admin_routes,
    analytics_routes,
    composition_routes,
    experiments_routes,
    feedback_routes,
    openai_routes,
    ops_routes,
    training_routes,
)
from gateway.deps import Gateway
from gateway.errors import install_error_handlers
from gateway.middleware import BodyLimitMiddleware, MetricsMiddleware, UnhandledErrorMiddleware
from gateway.settings import GatewaySettings


def create_app(
    settings: GatewaySettings,
    *,
    redis: aioredis.Redis,
    inference_channel: grpc.aio.Channel,
    analytics_channel: grpc.aio.Channel | None = None,
    experiments_channel: grpc.aio.Channel | None = None,
    activelearning_channel: grpc.aio.Channel | None = None,
    training_channel: grpc.aio.Channel | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    """The caller owns `redis` and `inference_channel`; `on_shutdown` (e.g. closing them)
    runs when the server stops the app. It has to run there, inside the lifespan: uvicorn
    re-raises a caught SIGTERM once it has stopped, so code after its serve() never runs."""

    gateway = Gateway(
        settings,
        redis,
        inference_channel,
        analytics_channel,
        experiments_channel,
        activelearning_channel,
        training_channel,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if gateway.assigner is not None:
            gateway.assigner.start()
        if gateway.exporter is not None:
            gateway.exporter.start()
        if gateway.candidates is not None:
            gateway.candidates.start()
        yield
        if gateway.candidates is not None:  # flush candidates before channels close
            await gateway.candidates.close()
        if gateway.exporter is not None:  # flush usage events before channels close
            await gateway.exporter.close()
        if gateway.assigner is not None:  # before the redis client closes
            await gateway.assigner.close()
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(
        title="loraplex gateway",
        summary="OpenAI-compatible and admin HTTP API over the loraplex services",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(analytics_routes.router)
    app.include_router(experiments_routes.router)
    app.include_router(composition_routes.router)
    app.include_router(active_learning_routes.router)
    app.include_router(feedback_routes.router)
    app.include_router(ops_routes.router)
    app.include_router(training_routes.router)
    app.include_router(training_routes.admin_router)
    # Added last = outermost: metrics also count the 413s and 500s the others produce.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_request_bytes,
        prefix_limits={
            admin_routes.router.prefix + "/": settings.max_upload_bytes,
            training_routes.router.prefix + "/jobs": settings.max_upload_bytes,  # datasets
        },
    )
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(MetricsMiddleware)
    return app
