"""The FastAPI application, built from its dependencies (nothing global, nothing opened)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import redis.asyncio as aioredis
from fastapi import FastAPI

from gateway import (
    active_learning_routes,
    admin_routes,
    analytics_routes,
    composition_routes,
    embeddings_routes,
    experiments_routes,
    feedback_routes,
    openai_routes,
    ops_routes,
    training_routes,
    vllm_routes,
)
from gateway.audit import AuditMiddleware
from gateway.deps import Gateway
from gateway.errors import document_errors, install_error_handlers
from gateway.middleware import BodyLimitMiddleware, MetricsMiddleware, UnhandledErrorMiddleware
from gateway.replicas import InferenceReplicas
from gateway.settings import GatewaySettings


def create_app(
    settings: GatewaySettings,
    *,
    redis: aioredis.Redis,
    inference_channel: grpc.aio.Channel | None = None,
    inference: InferenceReplicas | None = None,
    analytics_channel: grpc.aio.Channel | None = None,
    experiments_channel: grpc.aio.Channel | None = None,
    activelearning_channel: grpc.aio.Channel | None = None,
    training_channel: grpc.aio.Channel | None = None,
    resources: AsyncExitStack | None = None,
) -> FastAPI:
    """The inference replicas are `inference`, or the one behind `inference_channel`.
    The caller owns `redis` and the channels. `resources` (e.g. what closes them) is
    unwound when the server stops the app, after the exporters have flushed. It has to be
    unwound there, inside the lifespan: uvicorn re-raises a caught SIGTERM once it has
    stopped (after draining requests), so code after its serve() never runs."""

    if (inference is None) == (inference_channel is None):
        raise TypeError("create_app takes inference or inference_channel, not both or neither")
    gateway = Gateway(
        settings,
        redis,
        inference or InferenceReplicas.single(inference_channel),
        analytics_channel,
        experiments_channel,
        activelearning_channel,
        training_channel,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # One stack, unwound in reverse: exporters flush before the caller's channels close.
        async with AsyncExitStack() as stack:
            if resources is not None:
                await stack.enter_async_context(resources)
            await gateway.inference.start()  # health probes (and DNS lookups) of the replicas
            stack.push_async_callback(gateway.inference.close)
            if gateway.assigner is not None:  # hears definition changes; before redis closes
                gateway.assigner.start()
                stack.push_async_callback(gateway.assigner.close)
            for exporter in gateway.exporters:
                exporter.start()
                stack.push_async_callback(exporter.close)
            yield

    app = FastAPI(
        title="loraplex gateway",
        summary="OpenAI-compatible and admin HTTP API over the loraplex services",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(default_openapi())
        return app.openapi_schema

    app.openapi = openapi
    app.include_router(openai_routes.router)
    app.include_router(embeddings_routes.router)
    app.include_router(vllm_routes.router)
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
        read_timeout=settings.body_read_timeout_seconds,
    )
    app.add_middleware(AuditMiddleware)
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(MetricsMiddleware)
    return app
